"""The OpenAI-compatible server, driven with the official ``openai`` client over loopback.

Servers run in a background thread of this process (``ServerThread``, random free port), so
tests can also look at the decode worker's state. The real default model answers the
functional tests with a few tokens each; the tiny random model serves the error cases, the
queue limit and client disconnects, where only the plumbing matters.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from padlm import GenerationConfig, PersonalizedRewardModel, Personalizer
from padlm.bench.serve import Sample, percentile, summarize
from padlm.server.app import ServerThread, create_app
from padlm.server.rewards import chosen_token_reward
from padlm.server.schemas import ApiError, ChatCompletionRequest, parse_body

PROMPT = "Why is the sky blue?"


def client_for(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def real(default_lm):
    """The default model behind a live server; its own engine so its KV streams are private."""
    engine = Personalizer(default_lm, persrm="identity")
    app = create_app(engine, max_batch_size=8, max_queue=32)
    with ServerThread(app) as server:
        yield server, engine, app.state.service.worker


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    """The tiny random model with a random (non-identity) PersRM head: rewards are nonzero."""
    persrm = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    torch.manual_seed(1)
    with torch.no_grad():
        persrm.head.weight.add_(0.5 * torch.randn_like(persrm.head.weight))
    engine = Personalizer(tiny_lm, persrm=persrm)
    app = create_app(engine, max_batch_size=4, max_queue=8)
    with ServerThread(app) as server:
        yield server, engine, app.state.service.worker


# ---- pure pieces ---------------------------------------------------------------------------

def brute_force_reward(base: list[float], persrm: list[float], k: int, chosen: int) -> float:
    """PAD's reward by hand: log-softmax over K = top-k of base (plus the chosen token)."""
    order = sorted(range(len(base)), key=lambda i: -base[i])[:k]
    support = order if chosen in order else [*order, chosen]

    def log_softmax(values: list[float], at: int) -> float:
        return values[at] - math.log(sum(math.exp(values[i]) for i in support))

    return log_softmax(persrm, chosen) - log_softmax(base, chosen)


def test_chosen_token_reward_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 12, generator=generator)
    persrm = torch.randn(5, 12, generator=generator)
    k = torch.tensor([1, 3, 4, 12, 2])
    chosen = torch.tensor([int(base[0].argmax()), 7, int(base[2].argsort()[-2]), 3, 11])
    got = chosen_token_reward(base, lambda c: persrm.gather(1, c), chosen, k)
    want = [brute_force_reward(base[b].tolist(), persrm[b].tolist(), int(k[b]), int(chosen[b]))
            for b in range(5)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert got[0] == 0  # one candidate: the softmax over it is 1 for both models


def test_percentile_matches_numpy():
    values = np.random.default_rng(0).exponential(size=37).tolist()
    for q in (0, 5, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 95) == 3.0


def test_summarize_counts_only_successes():
    samples = [Sample(True, 1.0, 0.1, 10), Sample(True, 3.0, 0.3, 10),
               Sample(False, 0.5, error="429: busy")]
    row = summarize(4, samples, wall=2.0)
    assert row["tokens_per_second"] == 10.0 and row["errors"] == 1
    assert row["p50_latency_s"] == 2.0 and row["first_error"] == "429: busy"


@pytest.mark.parametrize(("raw", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": "hi"}', 422, "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 422, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "pad": {"weight": "high"}}', 422,
     "pad.weight"),
    (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}', 400,
     "presence_penalty"),
])
def test_parse_body_errors(raw, status, param):
    with pytest.raises(ApiError) as caught:
        parse_body(ChatCompletionRequest, raw)
    assert caught.value.status == status and caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


# ---- the real model ------------------------------------------------------------------------

@pytest.mark.slow
def test_chat_with_preference_matches_the_library(real):
    server, engine, _ = real
    response = client_for(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        extra_body={"preference": "P1A", "strategy": "pad", "pad": {"weight": 1.0}})
    choice = response.choices[0]
    expected = engine.generate([PROMPT], "P1A", "pad",
                               GenerationConfig(max_new_tokens=8, weight=1.0))[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.model == engine.lm.name and response.object == "chat.completion"
    usage = response.usage
    assert usage.completion_tokens == expected.new_tokens
    assert usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow
def test_echo_guard_reaches_the_decoder(real):
    """``pad.echo_guard`` gives the library's guarded answer, which here is not the plain one
    (Linear Alignment quotes P1B without the guard)."""
    server, engine, _ = real
    prompt, config = "Give me three tips for learning to cook.", GenerationConfig(
        max_new_tokens=24, no_repeat_ngram_size=3)
    answer = client_for(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}], max_tokens=24,
        extra_body={"preference": "P1B", "strategy": "linear-alignment",
                    "no_repeat_ngram_size": 3, "pad": {"echo_guard": True}},
    ).choices[0].message.content
    guarded, plain = (engine.generate([prompt], "P1B", "linear-alignment",
                                      replace(config, echo_guard=flag))[0].text
                      for flag in (True, False))
    assert answer == guarded != plain


@pytest.mark.slow
def test_streaming_equals_non_streaming(real):
    server, _, _ = real
    client = client_for(server)
    kwargs = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}],
              "max_tokens": 8, "extra_body": {"preference": "P3A"}}
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.slow
def test_raw_sse_ends_with_done_and_carries_token_rewards(real):
    server, _, _ = real
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "stream": True,
            "preference": "P2A", "token_rewards": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    extras = [json.loads(e)["padlm"] for e in events[:-1] if "padlm" in json.loads(e)]
    assert len(extras) == 5
    # the identity PersRM equals the base model: its token reward is zero up to rounding
    assert all(abs(x["reward"]) < 1e-3 and isinstance(x["token"], int) for x in extras)


@pytest.mark.slow
def test_n_choices_are_seeded_samples(real):
    server, _, _ = real
    client = client_for(server)
    kwargs = {"model": server.model, "messages": [{"role": "user", "content": "Name a colour."}],
              "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 7,
              "extra_body": {"preference": "P3A+P2A"}}
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed, seed+1, seed+2
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens <= 18


@pytest.mark.slow
def test_text_completions_models_and_best_of_n(real):
    server, engine, _ = real
    client = client_for(server)
    assert [m.id for m in client.models.list().data] == [engine.lm.name]
    response = client.completions.create(model=server.model, prompt=["Say hi.", "Say bye."],
                                         max_tokens=4, extra_body={"strategy": "base"})
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.text for c in response.choices)
    best = client.completions.create(model=server.model, prompt="Say hi.", max_tokens=4,
                                     best_of=2, extra_body={"strategy": "best-of-n",
                                                            "preference": "P2A"})
    assert best.choices[0].text and best.usage.completion_tokens <= 4


@pytest.mark.slow
def test_concurrent_users_share_a_batch_and_get_their_own_answers(real):
    """Different preferences and strategies at once: each answer equals what the library
    gives that request alone, and the worker really decoded several rows per step."""
    server, engine, worker = real
    client = client_for(server)
    cases = [("P1A", "pad"), ("P3B", "pad"), ("P2A", "linear-alignment"), (None, "base"),
             ("Answer like a pirate.", "pad"), ("P1B+P2A", "prompt")]

    def ask(case):
        preference, strategy = case
        return client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
            extra_body={"preference": preference, "strategy": strategy}
        ).choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    assert worker.stats["max_live_rows"] > 1
    config = GenerationConfig(max_new_tokens=6)
    for (preference, strategy), answer in zip(cases, answers, strict=True):
        assert answer == engine.generate([PROMPT], preference, strategy, config)[0].text


@pytest.mark.slow
def test_real_model_context_limit(real):
    server, engine, _ = real
    limit = engine.lm.model.config.max_position_embeddings
    with pytest.raises(openai.BadRequestError) as caught:  # max_tokens itself is capped
        client_for(server).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "word " * limit}],
            max_tokens=4)
    assert caught.value.code == "context_length_exceeded"


@pytest.mark.slow
def test_non_streaming_client_that_gives_up_frees_its_row(real):
    server, _, worker = real
    cancelled = worker.stats["rows_cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=1.5, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2000,
            "ignore_eos": True})
    wait_until(lambda: worker.stats["rows_cancelled"] == cancelled + 1, timeout=30)
    wait_until(lambda: worker.live_rows == 0)


# ---- errors, queue limit and disconnects (tiny model) --------------------------------------

ERROR_CASES = [
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     openai.BadRequestError, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
     openai.BadRequestError, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
     openai.UnprocessableEntityError, "max_tokens"),
    ({"messages": [{"role": "user", "content": 5}]}, openai.UnprocessableEntityError,
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": "word " * 1100}], "max_tokens": 4},
     openai.BadRequestError, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "telepathy"},
     openai.BadRequestError, "strategy"),
    ({"messages": [{"role": "user", "content": "hi"}], "preference": "P7C"},
     openai.BadRequestError, "preference"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     openai.BadRequestError, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "pad": {"top_k": 0}},
     openai.BadRequestError, "pad.top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "prompt",
      "pad": {"echo_guard": True}}, openai.BadRequestError, "pad.echo_guard"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, openai.BadRequestError, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     openai.BadRequestError, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "best-of-n",
      "stream": True}, openai.BadRequestError, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "prompt",
      "mix": {"weights": "uniform"}}, openai.BadRequestError, "mix.weights"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "mix", "preference": "P1A",
      "mix": {"weights": "telepathy"}}, openai.BadRequestError, "mix.weights"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "mix",
      "preference": "P1A+P2B", "mix": {"weights": [1.0]}}, openai.BadRequestError,
     "mix.weights"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "mix",
      "preference": "P1A+P2B", "mix": {"weights": [1, -1]}}, openai.BadRequestError,
     "mix.weights"),
    # prompted experts (the tiny model has no shipped ones) have no PCM to ask for
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "mix", "preference": "P1A",
      "mix": {"weights": "pcm"}}, openai.BadRequestError, "mix.weights"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "mix"},
     openai.BadRequestError, "preference"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "soups",
      "preference": "P1A+P2B", "mix": {"weights": "logit"}}, openai.BadRequestError,
     "mix.weights"),
    # the dimension rewards that score args and best-of-n refuse free text (and none)
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "args",
      "preference": "be nice"}, openai.BadRequestError, "preference"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "best-of-n",
      "preference": "be nice"}, openai.BadRequestError, "preference"),
    ({"messages": [{"role": "user", "content": "hi"}], "strategy": "best-of-n"},
     openai.BadRequestError, "preference"),
]


@pytest.mark.parametrize(("body", "error", "param"), ERROR_CASES)
def test_bad_requests_get_openai_errors(tiny, body, error, param):
    server, _, _ = tiny
    client = client_for(server)
    extra = {key: value for key, value in body.items() if key != "messages"}
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=server.model, messages=body["messages"],
                                       extra_body=extra)
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert caught.value.message


def test_mix_weights_reach_the_decoder_and_come_back_per_token(tiny):
    """``strategy: mix`` with fixed weights answers what the library answers with the same
    ``mix`` setting; the stream's ``padlm.mix_weights`` gives each token's expert weights
    and the non-streaming body all of them, per choice."""
    server, engine, _ = tiny
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
            "ignore_eos": True, "strategy": "mix", "preference": "P1A+P2B",
            "mix": {"weights": [3, 1]}}
    expected = engine.generate([PROMPT], "P1A+P2B", "mix", GenerationConfig(
        max_new_tokens=6, ignore_eos=True, mix="fixed:3,1"))[0]
    full = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    assert full["choices"][0]["message"]["content"] == expected.text
    assert full["padlm"]["mix_weights"] == [[{"P1A": 0.75, "P2B": 0.25}] * 6]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={**body, "stream": True}, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    weights = [e["padlm"]["mix_weights"] for e in events if "padlm" in e]
    assert weights == [{"P1A": 0.75, "P2B": 0.25}] * 6
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e["choices"]) == expected.text


def test_mix_on_the_default_model_streams_like_the_library(real):
    """The default model's experts (shipped, else prompted) mixed with the default weights:
    the server's text equals the library's, and every token's weights sum to one."""
    server, engine, _ = real
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
            "strategy": "mix", "preference": "P1A+P2B+P3A", "stream": True, "ignore_eos": True}
    expected = engine.generate([PROMPT], "P1A+P2B+P3A", "mix",
                               GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e["choices"]) == expected.text
    weights = [e["padlm"]["mix_weights"] for e in events if "padlm" in e]
    assert len(weights) == expected.new_tokens
    assert all(set(w) == {"P1A", "P2B", "P3A"} and math.isclose(sum(w.values()), 1.0,
                                                                 rel_tol=1e-5)
               for w in weights)


def test_malformed_json_and_unknown_routes(tiny):
    server, _, _ = tiny
    for raw in (b"{oops", b"", b'"just a string"'):
        response = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(f"{server.url}/v1/engines")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_request_naming_no_strategy_gets_base_without_a_preference_and_pad_with_one(tiny):
    """What a plain OpenAI client (an LLM judge, say) sends must mean the base model, on every
    engine; with a preference the server's default personalizes."""
    server, engine, _ = tiny
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    for preference, strategy in ((None, "base"), ("P1A", "pad")):
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
                "ignore_eos": True, **({"preference": preference} if preference else {})}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["padlm"]["strategy"] == strategy
        expected = engine.generate([PROMPT], preference, strategy, config)[0].text
        assert reply["choices"][0]["message"]["content"] == expected
    # base and pad must differ here, or the two cases above could not tell them apart
    assert (engine.generate([PROMPT], None, "base", config)[0].text
            != engine.generate([PROMPT], "P1A", "pad", config)[0].text)


def test_server_keeps_serving_after_errors_and_streams_rewards(tiny):
    server, _, worker = tiny
    client = client_for(server)
    for body, error, _ in ERROR_CASES[:4]:
        with pytest.raises(error):
            client.chat.completions.create(model=server.model, messages=body["messages"],
                                           max_tokens=body.get("max_tokens", 3))
    response = client.completions.create(model=server.model, prompt="hello", max_tokens=5,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 5
    events = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "ignore_eos": True, "token_rewards": True, "preference": "P1A"}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines()
                  if line.startswith("data: {")]
    rewards = [e["padlm"]["reward"] for e in events if "padlm" in e]
    assert len(rewards) == 6 and all(math.isfinite(r) for r in rewards)
    assert any(abs(r) > 1e-4 for r in rewards)  # the random head disagrees with the base
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["live_rows"] == 0
    assert worker.stats["jobs_failed"] == 0  # validation errors never reached the worker


@pytest.mark.slow
def test_full_queue_gets_429_and_a_disconnect_frees_its_row(default_lm):
    """max_batch_size 1, max_queue 1: one request decodes, one waits, the third is refused.
    Closing the first stream frees its row, and the waiting request then completes. (The
    real model: its 2000-token request surely outlives the few milliseconds this takes.)"""
    engine = Personalizer(default_lm, persrm="identity")
    app = create_app(engine, max_batch_size=1, max_queue=1)
    worker = app.state.service.worker
    with ServerThread(app) as server:
        client = client_for(server)
        long_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                     "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream(
                "POST", f"{server.url}/v1/chat/completions", json=long_body) as first:
            lines = first.iter_lines()
            next(line for line in lines if '"content"' in line and '"content": ""' not in line)
            assert worker.live_rows == 1
            result: dict = {}
            waiting = threading.Thread(target=lambda: result.update(
                answer=client.chat.completions.create(
                    model=server.model, messages=[{"role": "user", "content": "yo"}],
                    max_tokens=3)))
            waiting.start()
            wait_until(lambda: worker.snapshot()["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(
                    model=server.model, messages=[{"role": "user", "content": "hey"}], max_tokens=3)
            assert caught.value.code == "rate_limit_exceeded"
            assert caught.value.status_code == 429
        # the first client has gone away mid-stream
        waiting.join(60)
        assert result["answer"].choices[0].message.content is not None
        wait_until(lambda: worker.live_rows == 0)
        assert worker.stats["rows_cancelled"] == 1
        assert worker.stats["rows_finished"] == 1  # only the waiting request ran to the end


# ---- the command line ----------------------------------------------------------------------

PADLM = str(Path(sys.executable).parent / "padlm")


def test_serve_rejects_a_busy_port_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([PADLM, "serve", "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_serve_end_to_end(tmp_path):
    """The real command: it starts its own server process, measures two levels, exits; its
    record holds the same levels and what ran them."""
    done = subprocess.run([PADLM, "bench", "serve", "--clients", "1,2", "--requests", "2",
                           "--max-tokens", "3", "--persrm", "identity", "--json",
                           "--long-prompt-tokens", "300",
                           "--record", str(tmp_path / "serve.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    record = json.loads((tmp_path / "serve.json").read_text())
    assert record["results"]["hf"] == result and record["persrm"] == "identity"
    assert record["command"].startswith("padlm bench serve --clients 1,2")
    assert record["torch"] and record["threads"] >= 1 and "commit" in record
    assert [level["clients"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["errors"] == 0 and level["requests"] == 2 and level["tokens"] == 6
        assert level["tokens_per_second"] > 0
        assert 0 < level["p50_ttft_s"] <= level["p50_latency_s"] <= level["p95_latency_s"]
    assert result["levels"][0]["speedup_vs_1_client"] == 1.0
    beside_long = result["long_prompt_level"]  # 2 clients: 1 ordinary + 1 long-prompt one
    assert beside_long["clients"] == 1 and beside_long["errors"] == 0
    assert beside_long["long_prompt"]["requests"] >= 1
    assert beside_long["long_prompt"]["errors"] == 0
    assert beside_long["p95_inter_token_s"] > 0 and beside_long["p95_inter_token_vs_plain"] > 0


def test_a_dead_servers_error_is_the_line_that_names_it():
    """bench serve / vllm-dp: shutdown warnings after the error do not hide it."""
    import sys

    from padlm.bench.serve import failure_line, running_server
    from padlm.errors import PadlmError

    assert failure_line("loading\nRuntimeError: no port\n  warnings.warn('x')\n") == \
        "RuntimeError: no port"
    assert failure_line("just this\n") == "just this" and failure_line("") == ""
    dying = [sys.executable, "-c", "import sys; print('KeyError: boom'); print('bye'); "
                                   "sys.exit(3)"]
    with (pytest.raises(PadlmError, match="exited with code 3: KeyError: boom"),
          running_server(dying, "http://127.0.0.1:9")):
        pass


def test_engines_table_ratios_come_from_one_run():
    """bench serve --engine hf,vllm: each engine's tokens/s over the first one's, per level."""
    from padlm.bench.serve import engines_table

    def levels(*rates):
        return {"levels": [{"clients": c, "tokens_per_second": r, "p50_latency_s": 1.0}
                           for c, r in zip((1, 8), rates, strict=True)]}

    table = engines_table({"hf": levels(10.0, 40.0), "vllm": levels(15.0, 100.0)})
    lines = table.splitlines()
    assert lines[0] == ("| clients | hf tokens/s | hf p50 latency s | vllm tokens/s | "
                        "vllm p50 latency s | vllm / hf |")
    assert lines[2] == "| 1 | 10.0 | 1.0 | 15.0 | 1.0 | 1.50x |"
    assert lines[3] == "| 8 | 40.0 | 1.0 | 100.0 | 1.0 | 2.50x |"
