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


def split_rows(rows: Sequence[PreferenceRow], fraction: float = VALIDATION_FRACTION,
               ) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """``(train, validation)``, disjoint by prompt."""
    train, validation = [], []
    for row in rows:
        (validation if is_validation(row.prompt_key, fraction) else train).append(row)
    return train, validation
