"""MiniLM embeddings of preference texts, cached per text, and which experts a request asks for.

The PCM reads a request's preference as an embedding (so free text and unseen combinations get
weights too), and a free-text request is routed to the experts whose own preference texts are
nearest to it. Both read the same cached embeddings (:data:`PREFERENCE_EMBEDDINGS`).

Why not ``functools.lru_cache``: it keys on the text itself, so every cached preference pins its
whole string (40 distinct 1 MB preferences pinned 50 MB; 4,096 would pin gigabytes). The cache
here keys on a SHA-256 digest of the text and is bounded in bytes as well as in entries.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from padlm.core.preferences import PRESETS, Preference
from padlm.errors import PadlmError

V = TypeVar("V")

ENTRY_OVERHEAD = 200  # bytes an entry costs beyond its key and value: the OrderedDict node,
# the tensor's Python object; an estimate, so the byte bound errs on the side of fewer entries


def tensor_bytes(value: torch.Tensor) -> int:
    """What a cached tensor holds in memory: its whole storage (a view pins all of it)."""
    return value.untyped_storage().nbytes()


class DigestLRU(Generic[V]):
    """A thread-safe LRU cache from text to value, keyed by ``sha256(namespace, text)`` and
    bounded both in entries and in bytes (keys + values + a per-entry overhead).

    No text is retained: the key is a 32-byte digest, so a 1 MB preference costs 32 bytes of
    key, not 1 MB. Values are weighed with ``weigh`` when stored; an entry heavier than the
    whole byte budget is returned but not kept. A lock guards the table (the server's decode
    thread and its planning thread both ask); ``compute`` runs outside it, so a slow miss on one
    thread never blocks a hit on the other (two threads missing the same text at once both
    compute it, and the second store wins: same text, same value).

    Timing side channel: a hit answers faster than a miss (~2 ms vs ~29 ms for MiniLM), so
    whoever can time requests can tell whether a text was asked for before in the same
    ``namespace``. Entries of different namespaces never answer each other, so a caller that
    knows its tenant (e.g. a hash of the API key) passes it and a tenant learns nothing about
    another tenant's texts. Not protected: anything within one namespace (``padlm serve`` has
    one API key today, so all its clients share the default namespace ``""``), and the shared
    budget, by which one tenant's traffic can evict another's entries (that reveals how much
    others send, not what).
    """

    def __init__(self, max_entries: int, max_bytes: int,
                 weigh: Callable[[V], int] = sys.getsizeof) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a cache needs room for at least one entry and one byte")
        self.max_entries, self.max_bytes, self.weigh = max_entries, max_bytes, weigh
        self._entries: OrderedDict[bytes, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(text: str, namespace: str = "") -> bytes:
        """``sha256(len(namespace), namespace, text)``: the length prefix keeps ``("a", "bc")``
        and ``("ab", "c")`` apart; ``surrogatepass`` lets any Python string be hashed."""
        digest = hashlib.sha256()
        name = namespace.encode("utf-8", "surrogatepass")
        digest.update(len(name).to_bytes(8, "little"))
        digest.update(name)
        digest.update(text.encode("utf-8", "surrogatepass"))
        return digest.digest()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether a digest from :meth:`key` is held (a lookup that does not count as a use)."""
        with self._lock:
            return key in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes the entries weigh now (never above ``max_bytes``)."""
        return self._bytes

    def keys(self) -> list[bytes]:
        """The digests held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def get(self, text: str, compute: Callable[[str], V], namespace: str = "") -> V:
        """The value for ``text`` in ``namespace``, computing and storing it on a miss."""
        key = self.key(text, namespace)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        value = compute(text)
        self.put(key, value)
        return value

    def put(self, key: bytes, value: V) -> None:
        """Store ``value`` under a digest from :meth:`key`, evicting least recently used
        entries until both bounds hold."""
        size = sys.getsizeof(key) + self.weigh(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted


# 4,096 preferences (as the lru_cache held) at ~1.8 KB each (a 384-float embedding, its key,
# the overhead) fit in 8 MiB
PREFERENCE_EMBEDDINGS: DigestLRU[torch.Tensor] = DigestLRU(
    max_entries=4096, max_bytes=8 * 2**20, weigh=tensor_bytes)


def _encode(text: str) -> torch.Tensor:
    from padlm.judges.embedding import default_encoder

    # a copy: the encoder's row is a view of its batch, whose whole storage a view would pin
    return default_encoder().encode([text])[0].clone()


def embed_texts(texts: Sequence[str], namespace: str = "") -> torch.Tensor:
    """``[len(texts), 384]`` unit MiniLM embeddings; each distinct text is encoded once while
    it stays in :data:`PREFERENCE_EMBEDDINGS` (the decode loop asks at every step).
    ``namespace`` separates callers' entries (see :class:`DigestLRU` for what that hides)."""
    return torch.stack([PREFERENCE_EMBEDDINGS.get(text, _encode, namespace) for text in texts])


def axis(dimension: str) -> str:
    """``P1A`` -> ``P1``: the P-Soups axis whose two poles are opposites."""
    return dimension[:2]


def requested_experts(preference: Preference, dimensions: tuple[str, ...], lanes: int,
                      namespace: str = "") -> tuple[str, ...]:
    """The experts a request's preference asks for, at most ``lanes`` of them.

    A preference of preset ids (``P1A+P2B``) names its experts directly; free text goes to
    the nearest expert (cosine of MiniLM embeddings) on each of the ``lanes`` axes closest to
    it, so a wording never seen in training still gets a mixture. Not cached itself: the preset
    path reads the parsed ids, and the free-text path reads the embedding cache (under
    ``namespace``; the preset texts, public, under the default one) and then does one small
    matrix product.
    """
    if not preference:
        raise PadlmError("a mixture needs a preference (e.g. P1A+P2B+P3A)", param="preference")
    ids = preference.ids
    if ids is None:
        similarity = embed_texts([preference.text], namespace) @ embed_texts(
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
