"""Preference texts: the P-Soups dimensions, PAD's own, and parsing of ``P1A+P2A`` style ids."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

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


def named_presets(preference: str) -> list[str] | None:
    """The preset ids a preference names: ids (``P1A+P2B``) or the text
    :func:`resolve_preference` makes of them (their texts joined by spaces); None for free
    text. What a request carries is the resolved text, so this is how a component that
    needs the ids (a per-dimension reward, an expert) gets them back."""
    ids = preference_ids(preference)
    if ids is not None:
        return ids
    rest, ids = preference.strip(), []
    while rest:
        match = next((key for key, text in PRESETS.items() if rest.startswith(text)), None)
        if match is None:
            return None
        ids.append(match)
        rest = rest[len(PRESETS[match]):].lstrip()
    return ids or None


def preset_text(ids: Sequence[str]) -> str:
    """The text the models see for preset ids, in order (``P1A+P2B`` -> both texts)."""
    return " ".join(PRESETS[i] for i in ids)


def resolve_preference(spec: str | None) -> str:
    """Turn a user's preference (ids or free text) into the text the models see."""
    if spec is None or not spec.strip():
        return ""
    ids = preference_ids(spec)
    if ids is not None:
        return preset_text(ids)
    if looks_like_ids(spec):
        unknown = [p for p in spec.split("+") if p.strip() not in PRESETS]
        raise PadlmError(
            f"unknown preference id {', '.join(unknown)}; known ids: {', '.join(PRESETS)}"
        )
    return spec.strip()
