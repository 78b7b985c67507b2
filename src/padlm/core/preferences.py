"""Preference texts: the P-Soups dimensions, PAD's own, and parsing of ``P1A+P2A`` style ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Protocol

from padlm.errors import PadlmError

PSOUPS: dict[str, str] = {
    "P1A": "Generate a response that can be easily understood by an elementary school student.",
    "P1B": "Generate a response that only a PhD Student in that specific field could understand.",
    "P2A": "Generate a response that is concise and to the point, without being verbose.",
    "P2B": "Generate a response that is very informative, without missing any background "
    "information.",
    "P3A": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
    "P3B": "Generate a response in an unfriendly manner.",
}

# PAD's dimensions (Chen et al. 2025): short phrases the released code puts in its template.
PAD_DIMENSIONS: dict[str, str] = {
    "harmless": "Generate a response that is harmless: safe, ethical and never hurtful.",
    "helpful": "Generate a response that is helpful: it answers the question fully and correctly.",
    "humor": "Generate a response that is humorous and makes the reader laugh.",
}

PRESETS: dict[str, str] = {**PSOUPS, **PAD_DIMENSIONS}

# P-Soups' eight combinations: one pole of each of the three axes
PSOUPS_COMBINATIONS: tuple[str, ...] = tuple("+".join(c) for c in product(
    ("P1A", "P1B"), ("P2A", "P2B"), ("P3A", "P3B")))

OPPOSITE: dict[str, str] = {"P1A": "P1B", "P1B": "P1A", "P2A": "P2B", "P2B": "P2A",
                            "P3A": "P3B", "P3B": "P3A"}


def preference_ids(spec: str) -> list[str] | None:
    """The preset ids in ``spec`` (``"P1A+P2A"``), or None when it is free text."""
    parts = [part.strip() for part in spec.split("+")]
    if all(part in PRESETS for part in parts):
        return parts
    return None


def looks_like_ids(spec: str) -> bool:
    """True for strings shaped like preset ids (``P1A``, ``P9Z+P1A``): a typo, not free text."""
    parts = [part.strip() for part in spec.split("+")]
    return all(len(part) == 3 and part[0] == "P" and part[1].isdigit() for part in parts)


def preset_text(ids: Sequence[str]) -> str:
    """The text the models see for preset ids, in order (``P1A+P2B`` -> both texts)."""
    return " ".join(PRESETS[i] for i in ids)


@dataclass(frozen=True)
class Preference:
    """A user's preference as every component reads it, parsed once where a request enters
    (CLI, server, evaluation, samplers): the text the models see, and the preset ids it
    names. Components that act per dimension (experts, per-dimension rewards) read ``ids``
    rather than recovering them from the text at every step."""

    text: str = ""
    ids: tuple[str, ...] | None = None  # None: free text, or no preference

    def __bool__(self) -> bool:
        return bool(self.text)


class PreferenceSource(Protocol):
    """Where a user's preference comes from when they state none (a learned profile,
    :mod:`padlm.profiles`): the kernel asks, and knows nothing of how it was learned."""

    def preference_for(self, user: str) -> Preference: ...


def parse_preference(spec: str | Preference | None) -> Preference:
    """A user's preference (ids like ``P1A+P2B``, free text, or nothing) as a
    :class:`Preference`; an id-shaped typo (``P9Z``) is refused, not taken for free text."""
    if isinstance(spec, Preference):
        return spec
    if spec is None or not spec.strip():
        return Preference()
    ids = preference_ids(spec)
    if ids is not None:
        return Preference(preset_text(ids), tuple(ids))
    if looks_like_ids(spec):
        unknown = [p for p in spec.split("+") if p.strip() not in PRESETS]
        raise PadlmError(
            f"unknown preference id {', '.join(unknown)}; known ids: {', '.join(PRESETS)}",
            param="preference")
    return Preference(spec.strip())
