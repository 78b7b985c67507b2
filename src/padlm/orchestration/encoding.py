"""MiniLM embeddings of preference texts, cached per text, and which experts a request asks for.

The PCM reads a request's preference as an embedding (so free text and unseen combinations get
weights too), and a free-text request is routed to the experts whose own preference texts are
nearest to it. Both read the same cached embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from padlm.errors import PadlmError
from padlm.preferences import PRESETS, named_presets


@lru_cache(maxsize=4096)
def _embedding(text: str) -> torch.Tensor:
    from padlm.judges.embedding import default_encoder

    return default_encoder().encode([text])[0]


def embed_texts(texts: Sequence[str]) -> torch.Tensor:
    """``[len(texts), 384]`` unit MiniLM embeddings; each distinct text is encoded once per
    process (the decode loop asks at every step)."""
    return torch.stack([_embedding(text) for text in texts])


def axis(dimension: str) -> str:
    """``P1A`` -> ``P1``: the P-Soups axis whose two poles are opposites."""
    return dimension[:2]


@lru_cache(maxsize=4096)
def requested_experts(preference: str, dimensions: tuple[str, ...], lanes: int
                      ) -> tuple[str, ...]:
    """The experts a request's preference asks for, at most ``lanes`` of them.

    Preset ids (``P1A+P2B``) or their resolved texts name experts directly; free text goes to
    the nearest expert (cosine of MiniLM embeddings) on each of the ``lanes`` axes closest to
    it, so a wording never seen in training still gets a mixture.
    """
    if not preference.strip():
        raise PadlmError("a mixture needs a preference (e.g. P1A+P2B+P3A)", param="preference")
    ids = named_presets(preference)
    if ids is None:
        similarity = embed_texts([preference]) @ embed_texts(
            [PRESETS[d] for d in dimensions]).T
        best: dict[str, tuple[float, str]] = {}
        for dimension, score in zip(dimensions, similarity[0].tolist(), strict=True):
            best[axis(dimension)] = max(best.get(axis(dimension), (-2.0, "")),
                                        (score, dimension))
        return tuple(d for _, d in sorted(best.values(), reverse=True)[:lanes])
    unknown = [i for i in ids if i not in dimensions]
    if unknown:
        raise PadlmError(f"no expert for {', '.join(unknown)}; these experts cover "
                         f"{', '.join(dimensions)}", param="preference")
    ids = list(dict.fromkeys(ids))
    if len(ids) > lanes:
        raise PadlmError(f"a mixture takes at most {lanes} experts, got {len(ids)}: "
                         f"{'+'.join(ids)}", param="preference")
    return tuple(ids)
