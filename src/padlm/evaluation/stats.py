"""Directional win rates and their bootstrap intervals (pure functions, tested by brute force).

A *directional win* on one prompt: the method's judge score moved the way the preference
wants relative to ``base`` on the same prompt (sign * (method - base) > 0). Ties (the same
score, e.g. an identical output) count one half, so a method that changes nothing scores 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def outcomes(method: Sequence[float], base: Sequence[float], sign: int,
             tolerance: float = 1e-9) -> np.ndarray:
    """Per-prompt outcome: 1 win, 0.5 tie, 0 loss."""
    delta = sign * (np.asarray(method, dtype=float) - np.asarray(base, dtype=float))
    return np.where(delta > tolerance, 1.0, np.where(delta < -tolerance, 0.0, 0.5))


def win_rate(method: Sequence[float], base: Sequence[float], sign: int) -> float:
    result = outcomes(method, base, sign)
    return float(result.mean()) if result.size else float("nan")


def bootstrap_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample prompts with replacement."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def standard_error(values: Sequence[float]) -> float:
    """Of the mean: sample standard deviation / sqrt(n) (nan below two values)."""
    data = np.asarray(values, dtype=float)
    return float(data.std(ddof=1) / np.sqrt(data.size)) if data.size > 1 else float("nan")


def paired_differences(per_prompt: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """For every ordered pair of methods scored on the same prompts (in the same order):
    the mean of ``a - b`` over prompts and its paired standard error, keyed ``"a - b"``.
    Pairing removes what the prompts share, so it is the honest error of a difference."""
    out = {}
    names = list(per_prompt)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = np.asarray(per_prompt[a], dtype=float) - np.asarray(per_prompt[b],
                                                                        dtype=float)
            out[f"{a} - {b}"] = {"difference": round(float(diff.mean()), 4),
                                 "se": round(standard_error(diff), 4), "prompts": diff.size}
    return out
