"""Per-request decoding settings, validated when they are made.

Torch-free, so the CLI and the server check a request before loading anything. Every error
names its field (``PadlmError.param``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from padlm.errors import PadlmError

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed
# Bounds that keep every score finite. A guidance reward is a log-probability ratio over the
# candidates, a few tens of nats at most; at |weight| = 100 it already outweighs any gap in
# the base logits (the guidance alone decides), so larger weights only risk overflow: 1e308
# is inf in float32, and inf scores sample NaN. Scores then stay below ~1e6, and dividing by
# a temperature >= 1e-3 (or by a repetition penalty >= 1e-2) keeps them far inside float32.
MAX_WEIGHT = 100.0
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 2.0  # OpenAI's upper bound; 0 means greedy
MIN_PENALTY, MAX_PENALTY = 1e-2, 1e2
MIX_MODES = ("pcm", "uniform", "logit")
# What PAD's token reward ``r(a) = log softmax_K z_G(a) - log softmax_K z_ref(a)`` measures the
# guide against: the base model with the preference (PAD's released rule) or without it, the
# guide's own backbone (no head, no adapter) with the preference or without it, or nothing
# (the guide's log-probabilities ARE the reward, as GenARM's autoregressive reward models).
# On a PersRM that shares the base model's backbone, ``guide`` is ``base``.
REWARD_REFERENCES = ("base", "base-unconditioned", "guide", "guide-unconditioned", "none")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; ``weight``/``top_k`` are the strategy's knobs, ``None`` meaning the
    strategy's own default (the PersRM's saved ``top_k`` and weight for PAD, else 10 / 1.0)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    weight: float | None = None
    top_k: int | None = None
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    # no guidance bonus for the preference's own words (they echo it); strategies declare
    # whether they take it (StrategySpec.echo_guard)
    echo_guard: bool = False
    # orchestration: "pcm" | "uniform" | "logit" | "fixed:0.5,0.3,0.2"; None: the default
    mix: str | None = None
    # PAD's reward reference (REWARD_REFERENCES); None: the guide's saved one
    reference: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_int(self.max_new_tokens), "max_new_tokens", "max_new_tokens must be an integer")
        _check(self.max_new_tokens >= 1, "max_new_tokens",
               f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.top_k is None or _is_int(self.top_k), "top_k", "top-k must be an integer")
        _check(self.top_k is None or self.top_k >= 1, "top_k",
               f"top-k must be >= 1, got {self.top_k}")
        _check(_finite(self.temperature) and (
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE),
            "temperature", f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} "
                           f"and {MAX_TEMPERATURE:g}, got {self.temperature}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"top-p must be in (0, 1], got {self.top_p}")
        _check(self.weight is None or (_finite(self.weight) and abs(self.weight) <= MAX_WEIGHT),
               "weight", f"weight must be a number within +-{MAX_WEIGHT:g}, got {self.weight}")
        _check(_finite(self.repetition_penalty)
               and MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY, "repetition_penalty",
               f"repetition penalty must be between {MIN_PENALTY:g} and {MAX_PENALTY:g}, got "
               f"{self.repetition_penalty}")
        _check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
               "no_repeat_ngram_size", "no-repeat-ngram size must be >= 0")
        _check(self.seed is None or (_is_int(self.seed) and -SEED_LIMIT <= self.seed
                                     < SEED_LIMIT),
               "seed", f"seed must be an integer in [-2**63, 2**63), got {self.seed}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop strings must be non-empty text")
        if self.mix is not None:
            mix_weights(self.mix)
        _check(self.reference is None or self.reference in REWARD_REFERENCES, "reference",
               f"reference must be one of {', '.join(REWARD_REFERENCES)}, got "
               f"{self.reference!r}")


def mix_weights(mix: str) -> str | tuple[float, ...]:
    """Parse a mix setting: a mode name, or ``fixed:w1,w2,...`` (non-negative, not all 0),
    returned normalised to sum 1. Normalised here, in float64 and by the largest weight first,
    because weights finite in float64 need not be in float32 (``1e300``; ``1e-50`` rounds to
    0): the decode step's float32 tensors then only ever see values in [0, 1]."""
    if mix in MIX_MODES:
        return mix
    if mix.startswith("fixed:"):
        try:
            weights = tuple(float(w) for w in mix.removeprefix("fixed:").split(","))
        except ValueError:
            weights = ()
        if weights and all(_finite(w) and w >= 0 for w in weights) and max(weights) > 0:
            scaled = [w / max(weights) for w in weights]
            return tuple(w / sum(scaled) for w in scaled)
    raise PadlmError(f"mix must be one of {', '.join(MIX_MODES)} or fixed:w1,w2,... with "
                     f"non-negative weights, got {mix!r}", param="mix")


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise PadlmError(message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)
