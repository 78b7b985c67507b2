"""Which engine, device and dtype to run on: ``auto`` means CUDA when present, else the CPU.

One place decides, so the CLI, the server, the library and the trainers agree on what
``--engine``, ``--device auto`` and the default dtype mean.
"""

from __future__ import annotations

import torch

from padlm.errors import PadlmError

AUTO = "auto"
# hf: padlm's own decode loop (every strategy); vllm: a vLLM engine (padlm.vllm)
ENGINES = ("hf", "vllm")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise PadlmError(f"--engine must be {' or '.join(ENGINES)}, not {engine!r}",
                         param="engine")
    return engine


def resolve_device(device: str | torch.device = AUTO) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a torch.device) to a usable device."""
    if isinstance(device, torch.device):
        return device
    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PadlmError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise PadlmError(f"unsupported device {device!r}; choose auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PadlmError(f"device {device!r} asked for, but this machine has no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PadlmError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


def default_dtype(device: torch.device) -> str:
    """bf16 on a GPU (half the memory, full speed); fp32 on the CPU, where every
    equivalence test and saved result was measured."""
    return "bfloat16" if device.type == "cuda" else "float32"
