"""Hold out by prompt: a row's split is a pure function of its prompt text.

Hashing the prompt (not the row) means every row of a prompt, for every preference,
lands on the same side, so validation prompts are never seen in training, whatever the
build order, ``--limit`` or resume history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from padlm.data.schema import PreferenceRow

VALIDATION_FRACTION = 0.15


def prompt_bucket(prompt_key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a prompt."""
    digest = hashlib.sha256(prompt_key.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(prompt_key: str, fraction: float = VALIDATION_FRACTION) -> bool:
    return prompt_bucket(prompt_key) < fraction


def in_fold(prompt_key: str, fold: tuple[int, int]) -> bool:
    """Prompt-level k-fold: fold ``(i, k)`` holds the prompts whose bucket is in
    ``[i/k, (i+1)/k)``; across the k folds every prompt is validated exactly once."""
    index, folds = fold
    return index / folds <= prompt_bucket(prompt_key) < (index + 1) / folds


def split_rows(rows: Sequence[PreferenceRow], fraction: float = VALIDATION_FRACTION,
               fold: tuple[int, int] | None = None,
               ) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """``(train, validation)``, disjoint by prompt (a k-fold split when ``fold`` is given)."""
    train, validation = [], []
    for row in rows:
        held = (in_fold(row.prompt_key, fold) if fold is not None
                else is_validation(row.prompt_key, fraction))
        (validation if held else train).append(row)
    return train, validation
