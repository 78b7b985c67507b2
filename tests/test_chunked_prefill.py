"""Chunked prefill: a long prompt joins a running batch a chunk at a time (the server
interleaves its chunks with the other rows' steps), and decodes exactly as if prefilled in
one pass."""

from __future__ import annotations

import pytest
import torch

from padlm import GenerationConfig, Personalizer
from padlm.core.decoding import DecodeBatch, Request
from padlm.core.kvstream import KVStream
from padlm.core.preferences import parse_preference

LONG = " ".join(f"item{i} is red." for i in range(60))


def run_chunked(batch: DecodeBatch, requests: list[Request], chunk: int) -> dict:
    """Tokens per prompt with every prefill run ``chunk`` positions between steps."""
    batch.join(requests, chunk_tokens=chunk)
    while batch.rows or batch.prefilling:
        batch.prefill(chunk)
        batch.step()
    return {row.request.prompt: row.tokens for row in batch.finished}


def test_a_chunked_prefill_equals_one_pass(tiny_lm):
    contexts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30] * 7, [40, 41]]
    whole, chunked = KVStream(tiny_lm.model, lanes=2), KVStream(tiny_lm.model, lanes=2)
    expected = whole.join(contexts)
    prefill = chunked.prefill(contexts)
    outputs = [prefill.advance(4) for _ in range(3)]  # 2 requests x 2 lanes: 1 column each
    assert outputs == [None] * 3 and prefill.tokens_left == 4 * (11 - 3)
    while (out := prefill.advance(8)) is None:  # 2 columns per chunk
        pass
    prefill.merge()
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    step = torch.tensor([3, 4])
    torch.testing.assert_close(chunked.step(step).logits, whole.step(step).logits,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["base", "pad", "linear-alignment"])
def test_chunked_rows_decode_as_in_one_pass(default_lm, strategy):
    engine = Personalizer(default_lm, persrm="default")
    config = GenerationConfig(max_new_tokens=12, no_repeat_ngram_size=3)
    preference = parse_preference("P1A")
    requests = [Request(f"{LONG} Which item is red?", preference, config),
                Request("Name one color.", preference, config)]
    one_pass = {row.request.prompt: row.tokens for row in engine.batch(strategy).run(requests)}
    assert run_chunked(engine.batch(strategy), requests, chunk=64) == one_pass


def test_running_rows_step_while_a_long_prompt_prefills(tiny_engine):
    batch = tiny_engine.batch("base")
    config = GenerationConfig(max_new_tokens=40)
    [short] = batch.join([Request("Hi.", config=config)], chunk_tokens=32)
    assert batch.rows == [short]  # short prompts join at once
    [long] = batch.join([Request(LONG, config=config)], chunk_tokens=32)
    assert batch.waiting_rows == [long] and long not in batch.rows
    chunks = 0
    while batch.prefilling:
        assert [event.row for event in batch.step()] == [short]
        batch.prefill(32)
        chunks += 1
    context = max(len(lane) for lanes in long.contexts for lane in lanes)
    assert chunks == -(-context // 32)  # ceil: one chunk of 32 positions per step
    assert batch.rows == [short, long] and not long.tokens
    events = batch.step()
    assert [event.row for event in events] == [short, long]


def test_a_row_that_leaves_mid_prefill_stops_and_its_group_goes_on(tiny_engine):
    config = GenerationConfig(max_new_tokens=8)
    requests = [Request(f"{LONG} first", config=config),
                Request(f"{LONG} second", config=config)]
    alone = {row.request.prompt: row.tokens
             for row in tiny_engine.batch("base").run(requests[1:])}
    batch = tiny_engine.batch("base")
    first, second = batch.join(requests, chunk_tokens=64)
    batch.prefill(64)
    batch.leave([first])
    assert batch.waiting_rows == [second]
    while batch.rows or batch.prefilling:
        batch.prefill(64)
        batch.step()
    assert {row.request.prompt: row.tokens for row in batch.finished} == alone
    batch.join(requests[:1], chunk_tokens=64)
    batch.leave(batch.waiting_rows)
    assert not batch.prefilling and not batch.rows
