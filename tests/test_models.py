"""Model loading: the default-model cache under concurrency and after a crash, local dirs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from padlm.core import models
from padlm.errors import PadlmError

# A child process whose converter is slow and counts its calls: the real conversion
# dequantizes for ~25 s, which would test nothing more about the lock.
FAKE_CONVERT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from padlm.core import models

    def convert(gguf, out_dir):
        with open(sys.argv[1], "a") as log:
            log.write("converted\\n")
        time.sleep(1.0)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    models._find_gguf_in_site_packages = lambda: Path("fake.gguf")
    models._convert_gguf = convert
    print(models.ensure_default_model())
""")


def run_children(home: Path, count: int) -> list[str]:
    log = home / "conversions.log"
    env = {**os.environ, "PADLM_HOME": str(home)}
    children = [subprocess.Popen([sys.executable, "-c", FAKE_CONVERT, str(log)], env=env,
                                 stdout=subprocess.PIPE, text=True) for _ in range(count)]
    outputs = [child.communicate(timeout=300)[0].strip() for child in children]
    assert all(child.returncode == 0 for child in children)
    return outputs


def test_processes_starting_together_convert_once(tmp_path):
    outputs = run_children(tmp_path, 3)
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    assert outputs == [str(target)] * 3
    assert (tmp_path / "conversions.log").read_text().count("converted") == 1
    assert models.is_complete(target) and (target / "config.json").exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".build-")]


def test_half_written_cache_is_rebuilt(tmp_path):
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("truncated by a crash")  # no completion marker
    [output] = run_children(tmp_path, 1)
    assert output == str(target)
    assert not (target / "model.safetensors").exists()
    assert models.is_complete(target)


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(PadlmError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(PadlmError, match="has no config.json"):
        models.resolve_model_path(str(tmp_path))
    with pytest.raises(PadlmError, match="unknown dtype"):
        models.resolve_dtype("int3")


def test_any_local_directory_loads_in_the_requested_dtype(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path / "tiny")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = models.load_model(str(tmp_path / "tiny"), dtype="bfloat16")
    assert loaded.name == str(tmp_path / "tiny")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.chat_template == tiny_lm.tokenizer.chat_template
