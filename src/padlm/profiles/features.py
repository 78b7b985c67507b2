"""Per-axis features of a response, from padlm's own reward models: what a profile learns on.

A profile's axes are the P-Soups axes (P1 expertise, P2 length, P3 tone), each with two
opposed sides. A response's feature on an axis is the per-dimension Bradley-Terry reward
models' ``(r_A - r_B) / 2`` for the axis's two sides (:mod:`padlm.orchestration.rewards`,
the models shipped for the PCM's reward; the shipped heads are antisymmetric, so this is
``r_A``): one number per axis says how far the response leans to side A. These are
deliberately NOT the evaluation judges (readability formulas, word counts, VADER): a
learner fed the judges would be graded on the very numbers it learned from, and a simulated
user who chooses by the judges would be read by the learner directly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from padlm.data.axes import AXES as DATA_AXES
from padlm.data.axes import Axis

# a profile's axes; a positive weight means side ``a``
AXES: tuple[Axis, ...] = tuple(DATA_AXES[name] for name in ("P1", "P2", "P3"))


class AxisFeatures:
    """Scores responses on :data:`AXES` with the shipped per-dimension reward models,
    loaded on first use (MiniLM and six linear heads: a server that never sees a ``user``
    never loads them). Thread-safe: the server calls it from its handlers' threads."""

    axes = AXES

    def __init__(self, rewards=None) -> None:
        self._rewards = rewards
        self._lock = threading.Lock()

    def _loaded(self):
        with self._lock:
            if self._rewards is None:
                from padlm.orchestration.rewards import DimensionRewards, shipped_rewards_dir

                self._rewards = DimensionRewards.load(shipped_rewards_dir())
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
