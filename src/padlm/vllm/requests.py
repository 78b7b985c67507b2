"""What a vLLM request asks of padlm, and what the vLLM engine can run: vLLM-free.

Both the frontend (to refuse a bad request with HTTP 400 before it reaches the engine) and the
worker (to apply PAD) read a request's settings through :func:`pad_args`, so the two never
disagree. Nothing here imports vLLM or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from padlm.core.config import GenerationConfig
from padlm.core.persrm import PersRMConfig
from padlm.errors import PadlmError

ENGINE = "vllm"
EXTRA_KEY = "padlm"  # SamplingParams.extra_args["padlm"] = {"weight": ..., "top_k": ..., ...}
FLAT_PREFIX = "padlm_"  # vllm_xargs over HTTP holds no nested objects: padlm_weight=0.8, ...
FIELDS = ("weight", "top_k", "echo_guard", "preference")
# padlm's response-only repetition control (padlm.vllm.repetition), flat keys only:
# extra_args={"padlm_no_repeat_ngram_size": 3}; any request may ask, PAD or not
REPETITION_FIELDS = ("no_repeat_ngram_size", "repetition_penalty")
# strategies this engine runs: the ones whose every context is one sequence that vLLM can
# schedule alone (pad only with a conditioned PersRM on the shared backbone)
SUPPORTED = ("base", "prompt", "pad")
# the architectures the plugin wraps: vLLM's class name -> the name padlm registers it under
ARCHITECTURES = {"LlamaForCausalLM": "PadlmLlamaForCausalLM",
                 "Qwen2ForCausalLM": "PadlmQwen2ForCausalLM"}
ADDITIONAL_CONFIG_KEY = "padlm"  # vllm_config.additional_config["padlm"]["persrm"] = DIR


@dataclass(frozen=True)
class PadArgs:
    """One request's PAD settings; ``None`` fields take the PersRM's saved defaults."""

    weight: float | None = None
    top_k: int | None = None
    echo_guard: bool = False
    preference: str = ""  # only the echo guard reads it (the words it guards)


def pad_args(extra_args: Mapping[str, Any] | None) -> PadArgs | None:
    """The PAD settings in ``SamplingParams.extra_args``, or None when the request is plain.

    Accepts ``{"padlm": {"weight": 0.8}}`` (Python) and the flat ``{"padlm_weight": 0.8}``
    that vLLM's HTTP field ``vllm_xargs`` allows; validation is GenerationConfig's, so the
    errors read as they do on the HF engine.
    """
    if not extra_args:
        return None
    nested = extra_args.get(EXTRA_KEY)
    flat = {key.removeprefix(FLAT_PREFIX): value for key, value in extra_args.items()
            if key.startswith(FLAT_PREFIX)
            and key.removeprefix(FLAT_PREFIX) not in REPETITION_FIELDS}
    if nested is None and not flat:
        return None
    if nested is not None and not isinstance(nested, Mapping):
        raise PadlmError(f"extra_args[{EXTRA_KEY!r}] must be an object of "
                         f"{', '.join(FIELDS)}", param=EXTRA_KEY)
    settings = {**(nested or {}), **flat}
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise PadlmError(f"unknown padlm setting {', '.join(unknown)}; known: "
                         f"{', '.join(FIELDS)}", param=EXTRA_KEY)
    echo_guard = settings.get("echo_guard", False)
    if echo_guard not in (True, False, 0, 1):
        raise PadlmError("echo_guard must be true/false (or 1/0)", param="echo_guard")
    preference = settings.get("preference", "")
    if not isinstance(preference, str):
        raise PadlmError("preference must be text", param="preference")
    if echo_guard and not preference.strip():
        raise PadlmError("the echo guard needs the request's preference text (the words it "
                         "guards)", param="preference")
    checked = GenerationConfig(weight=settings.get("weight"), top_k=settings.get("top_k"),
                               echo_guard=bool(echo_guard))
    return PadArgs(checked.weight, checked.top_k, checked.echo_guard, preference)


@dataclass(frozen=True)
class RepetitionArgs:
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0


def repetition_args(extra_args: Mapping[str, Any] | None) -> RepetitionArgs | None:
    """The repetition control a request asks for, or None when it asks for none; validated
    as GenerationConfig validates it, so errors read as on the HF engine."""
    settings = {name: (extra_args or {})[FLAT_PREFIX + name] for name in REPETITION_FIELDS
                if FLAT_PREFIX + name in (extra_args or {})}
    checked = GenerationConfig(**settings)
    args = RepetitionArgs(checked.no_repeat_ngram_size, checked.repetition_penalty)
    return None if args == RepetitionArgs() else args


def repetition_extra_args(config: GenerationConfig) -> dict[str, Any]:
    """``config``'s repetition control as ``extra_args`` entries (empty when off)."""
    return {FLAT_PREFIX + name: getattr(config, name) for name in REPETITION_FIELDS
            if getattr(config, name) != getattr(GenerationConfig, name)}


def engine_refusal(strategy: str, why: str) -> PadlmError:
    """One wording for everything this engine cannot run, naming the strategy and the
    engine so the user knows what to change."""
    return PadlmError(f"{strategy} cannot run on the {ENGINE} engine: {why}; use --engine hf",
                      param="strategy")


def check_persrm(config: PersRMConfig, where: str) -> None:
    """Refuse a PersRM whose reward vLLM cannot compute: an unconditioned reference needs a
    preference-free context in lock-step with each row, and a LoRA PersRM a second backbone;
    vLLM schedules every sequence alone, so neither has a form there."""
    if config.unconditioned:
        raise engine_refusal("pad", f"the PersRM {where} measures its reward against the "
                             "preference-free base model (reference: unconditioned), a second "
                             "context decoded in lock-step")
    if config.lora:
        raise engine_refusal("pad", f"the PersRM {where} has a LoRA backbone, a second model "
                             "decoded in lock-step")


def padlm_architecture(architectures: list[str] | tuple[str, ...]) -> str:
    """The plugin's architecture name for a model whose HF config lists ``architectures``."""
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise PadlmError(f"the {ENGINE} engine runs PAD on {', '.join(ARCHITECTURES)} models, "
                     f"not {', '.join(architectures) or 'an unnamed architecture'}",
                     param="model")
