"""Per-axis features of a response, from padlm's own reward models: what a profile learns on.

A profile's axes are opposed pairs of preference sides: the P-Soups axes (P1 expertise, P2
length, P3 tone) by default, and any of the teacher data's free-text axes (register, format,
...) a server is started with (``--profile-axes``). A response's feature on an axis is the
per-dimension Bradley-Terry reward models' ``(r_A - r_B) / 2`` for the axis's two sides
(:mod:`padlm.orchestration.rewards`: the heads shipped for the PCM's reward for P-Soups, the
heads in ``assets/profile-rewards`` for the free-text sides; the heads of an axis are
near-antisymmetric, so this is about ``r_A``): one number per axis says how far the response
leans to side A. These are deliberately NOT the evaluation judges (readability formulas,
word counts, VADER, list lines): a learner fed the judges would be graded on the very
numbers it learned from, and a simulated user who chooses by the judges would be read by the
learner directly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from padlm.data.axes import AXES as DATA_AXES
from padlm.data.axes import Axis
from padlm.errors import PadlmError
from padlm.profiles.learning import MAX_EXPLORE_DIMS

PSOUPS_AXES = ("P1", "P2", "P3")
# the teacher data's free-text axes whose two sides have heads in assets/profile-rewards
FREE_TEXT_AXES = ("register", "format", "example", "outlook", "confidence", "energy",
                  "analogy", "voice")
# a profile's axes unless a server says otherwise; a positive weight means side ``a``
AXES: tuple[Axis, ...] = tuple(DATA_AXES[name] for name in PSOUPS_AXES)


def profile_rewards_dir() -> Path:
    """The free-text sides' reward heads (``padlm train rewards``; their held-out accuracy
    is in ``rewards.json`` there)."""
    return Path(str(resources.files("padlm") / "assets" / "profile-rewards"))


def parse_axes(spec: str) -> tuple[Axis, ...]:
    """``--profile-axes``: a comma list of axis names, refused when one has no reward heads
    (an axis nothing can score cannot be learned), repeats, or they are too many to
    explore."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    known = (*PSOUPS_AXES, *FREE_TEXT_AXES)
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise PadlmError(f"unknown profile axis {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}", param="profile_axes")
    if len(set(names)) != len(names) or len(names) > MAX_EXPLORE_DIMS:
        raise PadlmError(f"profile axes must be distinct and at most {MAX_EXPLORE_DIMS}",
                         param="profile_axes")
    return tuple(DATA_AXES[name] for name in names)


class AxisFeatures:
    """Scores responses on ``axes`` with the shipped per-dimension reward models, loaded on
    first use (MiniLM and linear heads: a server that never sees a ``user`` never loads
    them). Thread-safe: the server calls it from its handlers' threads."""

    def __init__(self, axes: Sequence[Axis] = AXES, rewards=None) -> None:
        self.axes = tuple(axes)
        self._rewards = rewards
        self._lock = threading.Lock()

    def _loaded(self):
        with self._lock:
            if self._rewards is None:
                from padlm.orchestration.rewards import DimensionRewards, shipped_rewards_dir

                # one set of heads, so every axis is scored from ONE encoder call
                heads = {**DimensionRewards.load(shipped_rewards_dir()).weights,
                         **DimensionRewards.load(profile_rewards_dir()).weights}
                self._rewards = DimensionRewards(heads)
            return self._rewards

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[list[float]]:
        """``[N][axes]``: each response's lean to side A of every axis (ONE encoder call)."""
        if not responses:
            return []
        rewards = self._loaded()
        with self._lock:  # one encoder call at a time (the tokenizer is not re-entrant)
            scores = rewards.scores(list(prompts), list(responses))
        index = rewards.dimensions.index
        sides = [(index(axis.a.id), index(axis.b.id)) for axis in self.axes]
        return [[(row[a] - row[b]) / 2 for a, b in sides] for row in scores.tolist()]
