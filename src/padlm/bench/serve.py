"""``padlm bench serve``: throughput and latency of the server under concurrent clients.

It starts ``padlm serve`` in a subprocess on loopback (or uses ``--url``), then for each
concurrency level fires ``--requests`` streaming chat requests from that many concurrent
clients (mixed P-Soups preferences, a fixed number of new tokens each: ``ignore_eos``), and
reports total generated tokens/s, p50/p95 latency and time to first token. The server runs in
its own process so the clients' event loop does not compete with the decode thread for the GIL.

With profiles, each client is one user who rates every answer before asking again, as a
playground's users do: what that costs the server (remembering each answer's features,
learning from each thumb) shows in the same tokens/s, beside the run without profiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx

from padlm.bench.kit import Stopwatch, ratio, render_table
from padlm.core.preferences import PSOUPS_COMBINATIONS
from padlm.core.registry import strategy_class
from padlm.errors import PadlmError

BENCH_PROMPTS = (
    "Explain why the sky is blue.",
    "How do vaccines train the immune system?",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Describe how a bicycle stays upright.",
    "Why do we dream?",
)
BENCH_PREFERENCES = ("P1A", "P2A", "P3A", "P1B", "P2B+P3A", "P3B")
BENCH_USER = "bench-user-"  # + the client's number: one user per client
RATINGS = ("up", "down")  # each user's thumbs, in turn
START_TIMEOUT_S = 900  # vLLM compiles the model at every start: minutes on a CPU


@dataclass
class Sample:
    """One request as a client saw it."""

    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None
    gaps: tuple[float, ...] = ()  # seconds between the chunks that carried content
    response_id: str | None = None  # what feedback on the answer names


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between order statistics (numpy's
    default), ``nan`` for no values.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(clients: int, samples: Sequence[Sample], wall: float) -> dict:
    """Aggregate one concurrency level; tokens/s counts generated tokens of successful
    requests over the level's wall-clock time."""
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    return {
        "clients": clients, "requests": len(samples), "errors": len(samples) - len(ok),
        "seconds": round(wall, 3), "tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else 0.0,
        "p50_latency_s": round(percentile([s.latency for s in ok], 50), 3),
        "p95_latency_s": round(percentile([s.latency for s in ok], 95), 3),
        "p50_ttft_s": round(percentile(ttfts, 50), 3),
        "p95_ttft_s": round(percentile(ttfts, 95), 3),
        "p95_inter_token_s": round(percentile([g for s in ok for g in s.gaps], 95), 4),
        "first_error": next((s.error for s in samples if not s.ok), None),
    }


def summarize_feedback(samples: Sequence[Sample]) -> dict:
    """A level's feedback requests, beside its chat requests' summary: a failed one is an
    error of its own (the answer it rated was fine)."""
    latencies = [s.latency for s in samples if s.ok]
    return {
        "feedback": len(samples), "feedback_errors": len(samples) - len(latencies),
        "p50_feedback_s": round(percentile(latencies, 50), 3),
        "p95_feedback_s": round(percentile(latencies, 95), 3),
        "first_feedback_error": next((s.error for s in samples if not s.ok), None),
    }


@functools.cache
def bench_preferences(strategy: str) -> tuple[str, ...]:
    """The expert strategies get P-Soups' eight combinations (three experts each), the
    others the single preferences and one pair."""
    return PSOUPS_COMBINATIONS if strategy_class(strategy).spec.uses_experts \
        else BENCH_PREFERENCES


def long_prompt(tokens: int) -> str:
    """A prompt of about ``tokens`` tokens (SmolLM2's and Qwen's tokenizers: ~7 a sentence),
    the shape of the one that froze the server before prefills were chunked."""
    return " ".join(f"item{i} is red." for i in range(max(1, tokens // 7)))


def refusal(status: int, text: str) -> str:
    """A refused request's error as a level reports it: the status, and enough of the body
    to say why without flooding the summary."""
    return f"{status}: {text[:200]}"


async def one_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int,
                      strategy: str, prompt: str | None = None, user: str | None = None
                      ) -> Sample:
    """A streaming chat request; time to first token = first chunk carrying content. A
    ``user``'s request states no preference, so it decodes for the user's profile (with
    the same ``strategy``, so that only the profile's own cost differs)."""
    preferences = bench_preferences(strategy)
    body = {"stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user",
                          "content": prompt or BENCH_PROMPTS[index % len(BENCH_PROMPTS)]}],
            **({"user": user} if user is not None
               else {"preference": preferences[index % len(preferences)]}),
            "strategy": strategy, "max_tokens": max_tokens, "ignore_eos": True}
    clock = Stopwatch()
    ttft, tokens, arrivals, response_id = None, 0, [], None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Sample(False, clock.elapsed(),
                              error=refusal(response.status_code, text))
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, clock.elapsed(), error=chunk["error"].get("message"))
                response_id = chunk.get("id", response_id)
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    arrivals.append(clock.elapsed())
                    ttft = arrivals[0]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return Sample(False, clock.elapsed(), error=repr(error))
    gaps = tuple(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    return Sample(True, clock.elapsed(), ttft, tokens, gaps=gaps, response_id=response_id)


async def rate(client: httpx.AsyncClient, url: str, user: str, response_id: str | None,
               rating: str) -> Sample:
    """A thumb on choice 0 of an answer (``POST /v1/feedback``), timed."""
    body = {"user": user, "response": {"id": response_id, "index": 0}, "rating": rating}
    clock = Stopwatch()
    try:
        response = await client.post(f"{url}/v1/feedback", json=body)
    except httpx.HTTPError as error:
        return Sample(False, clock.elapsed(), error=repr(error))
    if response.status_code != 200:
        return Sample(False, clock.elapsed(), error=refusal(response.status_code, response.text))
    return Sample(True, clock.elapsed())


async def share_requests(clients: int, requests: int, send: Callable[[int], Awaitable[None]],
                         time_left: Callable[[], bool] = lambda: True) -> None:
    """``clients`` concurrent loops take the next of ``requests`` request indexes until none
    is left (or ``time_left`` says stop): a client sends its next request as soon as its last
    one is answered, as a loaded server's clients do."""
    await serve_clients([send] * clients, requests, time_left)


async def serve_clients(senders: Sequence[Callable[[int], Awaitable[None]]], requests: int,
                        time_left: Callable[[], bool] = lambda: True) -> None:
    """:func:`share_requests` with a sender of its own for each client, for clients that
    differ (each its own user)."""
    counter = itertools.count()

    async def client_loop(send: Callable[[int], Awaitable[None]]) -> None:
        while time_left() and (index := next(counter)) < requests:
            await send(index)

    await asyncio.gather(*(client_loop(send) for send in senders))


async def run_level(url: str, clients: int, requests: int, max_tokens: int, strategy: str,
                    time_limit: float, long_prompt_tokens: int = 0, profiles: bool = False
                    ) -> dict:
    """``clients`` loops share ``requests`` requests; no new request starts after
    ``time_limit`` seconds (the level then reports fewer requests). With
    ``long_prompt_tokens``, one more client sends prompts that long (``max_tokens`` 1), one
    after another, until the others are done: the row reports only the others. With
    ``profiles``, client ``c`` is user ``bench-user-c``, who rates each answer (up, down, in
    turn) before the next request: the feedback's time counts in the level's."""
    samples: list[Sample] = []
    long_samples: list[Sample] = []
    feedback: list[Sample] = []
    clock = Stopwatch()
    done = asyncio.Event()

    async def long_loop(client: httpx.AsyncClient) -> None:
        prompt = long_prompt(long_prompt_tokens)
        while not done.is_set():
            long_samples.append(await one_request(client, url, 0, 1, strategy, prompt))

    def sender(client: httpx.AsyncClient, number: int) -> Callable[[int], Awaitable[None]]:
        user = f"{BENCH_USER}{number}" if profiles else None
        ratings = itertools.cycle(RATINGS)

        async def send(index: int) -> None:
            sample = await one_request(client, url, index, max_tokens, strategy, user=user)
            samples.append(sample)
            if user is not None and sample.ok:
                feedback.append(await rate(client, url, user, sample.response_id,
                                           next(ratings)))

        return send

    async def ordinary(client: httpx.AsyncClient) -> None:
        await serve_clients([sender(client, number) for number in range(clients)], requests,
                            lambda: clock.elapsed() < time_limit)
        done.set()

    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 60), limits=limits) as client:
        await asyncio.gather(ordinary(client),
                             *([long_loop(client)] if long_prompt_tokens else []))
    row = summarize(clients, samples, clock.elapsed())
    if profiles:
        row.update(summarize_feedback(feedback))
    if long_prompt_tokens:
        row["long_prompt"] = {"tokens": long_prompt_tokens, "requests": len(long_samples),
                              "errors": sum(not s.ok for s in long_samples),
                              "p50_latency_s": round(percentile(
                                  [s.latency for s in long_samples if s.ok], 50), 3)}
    return row


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def failure_line(log: str) -> str:
    """The line of a dead server's log that says why: the last one naming an error (shutdown
    warnings often follow it), else the last line.

    >>> failure_line("ValueError: port 29550 in use\\nwarnings.warn('resource_tracker')")
    'ValueError: port 29550 in use'
    """
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"\b\w*(Error|Exception)\b", line)]
    return (named or lines or [""])[-1]


@contextlib.contextmanager
def running_server(command: Sequence[str], url: str, env: dict[str, str] | None = None
                   ) -> Iterator[str]:
    """Run a server command (padlm's or vLLM's own) until the block ends; yields ``url`` once
    its ``/health`` answers. A server that exits first is an error quoting
    :func:`failure_line` of its log."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise PadlmError(f"the server exited with code {process.returncode}: "
                                     f"{failure_line(log.read())}")
                if time.monotonic() > deadline:
                    raise PadlmError(f"the server did not start within {START_TIMEOUT_S} s")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def local_server(model: str, persrm: str, dtype: str, max_batch_size: int,
                 engine: str = "hf", profiles: bool = False) -> Iterator[str]:
    """``python -m padlm.server`` on a free loopback port; yields its URL once healthy. Its
    profiles, if any, live in a fresh SQLite store removed afterwards, so every run starts
    from no profile and none touches $PADLM_HOME (without: ``--profiles none``, no cost)."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        store = "none"
        if profiles:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="padlm-bench-"))
            store = f"sqlite:///{os.path.join(folder, 'profiles.db')}"
        command = [sys.executable, "-m", "padlm.server", "--host", "127.0.0.1", "--port",
                   str(port), "--model", model, "--persrm", persrm, "--dtype", dtype,
                   "--max-batch-size", str(max_batch_size), "--max-queue", "4096",
                   "--max-queue-tokens", str(1 << 30), "--log-level", "warning", "--engine",
                   engine, "--profiles", store]
        yield stack.enter_context(running_server(command, f"http://127.0.0.1:{port}"))


FEEDBACK_COLUMNS = {"feedback": "feedback", "feedback_errors": "feedback errors",
                    "p50_feedback_s": "p50 feedback s", "p95_feedback_s": "p95 feedback s"}


def markdown_table(result: dict) -> str:
    long_row = result.get("long_prompt_level")
    feedback = FEEDBACK_COLUMNS if result.get("profiles") else {}
    rows = []
    for r in [*result["levels"], *([long_row] if long_row else [])]:
        speedup = r.get("speedup_vs_1_client")
        clients = r["clients"]
        if "long_prompt" in r:
            clients = (f"{clients} + 1 sending {r['long_prompt']['tokens']}-token prompts "
                       f"({r['p95_inter_token_vs_plain']}x the plain p95 inter-token)")
        rows.append((clients, r["requests"], r["errors"], r["tokens_per_second"],
                     "" if speedup is None else f"{speedup}x", r["p50_latency_s"],
                     r["p95_latency_s"], r["p50_ttft_s"], r["p95_ttft_s"],
                     r.get("p95_inter_token_s", ""), *(r.get(key, "") for key in feedback)))
    return render_table(("clients", "requests", "errors", "tokens/s", "vs 1 client",
                         "p50 latency s", "p95 latency s", "p50 TTFT s", "p95 TTFT s",
                         "p95 inter-token s", *feedback.values()), rows)


def engines_table(results: dict[str, dict]) -> str:
    """Tokens/s per server run (an engine, with or without profiles) and level, measured in
    one invocation, with each run's ratio to the first one."""
    names = list(results)
    first = {r["clients"]: r for r in results[names[0]]["levels"]}
    head = ["clients"]
    for name in names:
        head += [f"{name} tokens/s", f"{name} p50 latency s"]
    head += [f"{name} / {names[0]}" for name in names[1:]]
    rows = []
    for level in results[names[0]]["levels"]:
        clients = level["clients"]
        measured = [{r["clients"]: r for r in results[name]["levels"]}.get(clients)
                    for name in names]
        cells: list[object] = [clients]
        for r in measured:
            cells += [r["tokens_per_second"], r["p50_latency_s"]] if r else ["", ""]
        base = first[clients]["tokens_per_second"]
        for r in measured[1:]:
            share = ratio(r["tokens_per_second"], base, 2) if r else None
            cells.append("" if share is None else f"{share:.2f}x")
        rows.append(cells)
    return render_table(head, rows)


def runs_report(results: dict[str, dict]) -> str:
    """One run's table, or the runs' comparison; a run with profiles also gets its own
    table, since only that shows its feedback."""
    if len(results) == 1:
        return markdown_table(next(iter(results.values())))
    tables = [f"{name}:\n\n{markdown_table(result)}\n"
              for name, result in results.items() if result.get("profiles")]
    return "\n".join([*tables, engines_table(results)])


def run_bench(url: str, levels: Sequence[int], requests: int, max_tokens: int, strategy: str,
              time_limit: float, progress=lambda line: None, long_prompt_tokens: int = 0,
              profiles: bool = False) -> dict:
    """Warm up, then measure every level against a running server; with
    ``long_prompt_tokens``, the largest level once more with one of its clients sending long
    prompts instead, and its ordinary clients' p95 inter-token gap against the plain row's.
    With ``profiles`` (see :func:`run_level`) the warm-up rates too, so the server loads its
    reward models there and not in the first level."""
    level = functools.partial(run_level, url, max_tokens=max_tokens, strategy=strategy,
                              time_limit=time_limit, profiles=profiles)
    asyncio.run(level(min(2, max(levels)), 2))
    rows: list[dict] = []
    for clients in levels:
        row = asyncio.run(level(clients, requests))
        first = rows[0] if rows else row
        speedup = ratio(row["tokens_per_second"], first["tokens_per_second"], 2)
        if first["clients"] == 1 and speedup is not None:
            row["speedup_vs_1_client"] = speedup
        elif clients == 1:
            row["speedup_vs_1_client"] = 1.0
        rows.append(row)
        progress(json.dumps(row))
    result = {"url": url, "strategy": strategy, "max_tokens": max_tokens,
              "requests_per_level": requests, "profiles": profiles, "levels": rows}
    if long_prompt_tokens:
        plain = max(rows, key=lambda r: r["clients"])
        row = asyncio.run(level(plain["clients"] - 1, requests,
                                long_prompt_tokens=long_prompt_tokens))
        row["p95_inter_token_vs_plain"] = ratio(row["p95_inter_token_s"],
                                                plain["p95_inter_token_s"], 2)
        progress(json.dumps(row))
        result["long_prompt_level"] = row
    return result

