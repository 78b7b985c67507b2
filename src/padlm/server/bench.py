"""``padlm bench serve``: throughput and latency of the server under concurrent clients.

It starts ``padlm serve`` in a subprocess on loopback (or uses ``--url``), then for each
concurrency level fires ``--requests`` streaming chat requests from that many concurrent
clients (mixed P-Soups preferences, a fixed number of new tokens each: ``ignore_eos``), and
reports total generated tokens/s, p50/p95 latency and time to first token. The server runs in
its own process so the clients' event loop does not compete with the decode thread for the GIL.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer

from padlm.cli_options import DtypeOption, ModelOption, PersRMOption
from padlm.errors import PadlmError
from padlm.preferences import PSOUPS_COMBINATIONS
from padlm.registry import strategy_class

BENCH_PROMPTS = (
    "Explain why the sky is blue.",
    "How do vaccines train the immune system?",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Describe how a bicycle stays upright.",
    "Why do we dream?",
)
BENCH_PREFERENCES = ("P1A", "P2A", "P3A", "P1B", "P2B+P3A", "P3B")
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


async def one_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int,
                      strategy: str, prompt: str | None = None) -> Sample:
    """A streaming chat request; time to first token = first chunk carrying content."""
    preferences = bench_preferences(strategy)
    body = {"stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user",
                          "content": prompt or BENCH_PROMPTS[index % len(BENCH_PROMPTS)]}],
            "preference": preferences[index % len(preferences)],
            "strategy": strategy, "max_tokens": max_tokens, "ignore_eos": True}
    began = time.perf_counter()
    ttft, tokens, arrivals = None, 0, []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Sample(False, time.perf_counter() - began,
                              error=f"{response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, time.perf_counter() - began,
                                  error=chunk["error"].get("message"))
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    arrivals.append(time.perf_counter())
                    ttft = arrivals[0] - began
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return Sample(False, time.perf_counter() - began, error=repr(error))
    gaps = tuple(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    return Sample(True, time.perf_counter() - began, ttft, tokens, gaps=gaps)


async def run_level(url: str, clients: int, requests: int, max_tokens: int, strategy: str,
                    time_limit: float, long_prompt_tokens: int = 0) -> dict:
    """``clients`` loops share ``requests`` requests; no new request starts after
    ``time_limit`` seconds (the level then reports fewer requests). With
    ``long_prompt_tokens``, one more client sends prompts that long (``max_tokens`` 1), one
    after another, until the others are done: the row reports only the others."""
    counter = itertools.count()
    samples: list[Sample] = []
    long_samples: list[Sample] = []
    began = time.perf_counter()
    done = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() - began < time_limit:
            index = next(counter)
            if index >= requests:
                return
            samples.append(await one_request(client, url, index, max_tokens, strategy))

    async def long_loop(client: httpx.AsyncClient) -> None:
        prompt = long_prompt(long_prompt_tokens)
        while not done.is_set():
            long_samples.append(await one_request(client, url, 0, 1, strategy, prompt))

    async def ordinary(client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        done.set()

    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 60), limits=limits) as client:
        await asyncio.gather(ordinary(client),
                             *([long_loop(client)] if long_prompt_tokens else []))
    row = summarize(clients, samples, time.perf_counter() - began)
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
                 engine: str = "hf") -> Iterator[str]:
    """``python -m padlm.server`` on a free loopback port; yields its URL once healthy."""
    port = free_port()
    command = [sys.executable, "-m", "padlm.server", "--host", "127.0.0.1", "--port", str(port),
               "--model", model, "--persrm", persrm, "--dtype", dtype, "--max-batch-size",
               str(max_batch_size), "--max-queue", "4096", "--max-queue-tokens", str(1 << 30),
               "--log-level", "warning", "--engine", engine]
    with running_server(command, f"http://127.0.0.1:{port}") as url:
        yield url


def markdown_table(result: dict) -> str:
    lines = ["| clients | requests | errors | tokens/s | vs 1 client | p50 latency s | "
             "p95 latency s | p50 TTFT s | p95 TTFT s | p95 inter-token s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    long_row = result.get("long_prompt_level")
    for r in [*result["levels"], *([long_row] if long_row else [])]:
        ratio = r.get("speedup_vs_1_client")
        clients = r["clients"]
        if "long_prompt" in r:
            clients = (f"{clients} + 1 sending {r['long_prompt']['tokens']}-token prompts "
                       f"({r['p95_inter_token_vs_plain']}x the plain p95 inter-token)")
        lines.append(f"| {clients} | {r['requests']} | {r['errors']} | "
                     f"{r['tokens_per_second']} | {'' if ratio is None else f'{ratio}x'} | "
                     f"{r['p50_latency_s']} | {r['p95_latency_s']} | {r['p50_ttft_s']} | "
                     f"{r['p95_ttft_s']} | {r.get('p95_inter_token_s', '')} |")
    return "\n".join(lines)


def engines_table(results: dict[str, dict]) -> str:
    """Tokens/s per engine and level, measured in one run, with each engine's ratio to the
    first one named."""
    names = list(results)
    first = {r["clients"]: r for r in results[names[0]]["levels"]}
    head = " | ".join(f"{name} tokens/s | {name} p50 latency s" for name in names)
    ratios = " | ".join(f"{name} / {names[0]}" for name in names[1:])
    lines = [f"| clients | {head} | {ratios} |",
             "|---|" + "---|" * (2 * len(names) + len(names) - 1)]
    for level in results[names[0]]["levels"]:
        clients = level["clients"]
        rows = [{r["clients"]: r for r in results[name]["levels"]}.get(clients)
                for name in names]
        cells = " | ".join(f"{r['tokens_per_second']} | {r['p50_latency_s']}" if r else " | "
                           for r in rows)
        base = first[clients]["tokens_per_second"]
        shares = " | ".join(f"{r['tokens_per_second'] / base:.2f}x" if r and base else ""
                            for r in rows[1:])
        lines.append(f"| {clients} | {cells} | {shares} |")
    return "\n".join(lines)


def run_bench(url: str, levels: Sequence[int], requests: int, max_tokens: int, strategy: str,
              time_limit: float, progress=lambda line: None, long_prompt_tokens: int = 0
              ) -> dict:
    """Warm up, then measure every level against a running server; with
    ``long_prompt_tokens``, the largest level once more with one of its clients sending long
    prompts instead, and its ordinary clients' p95 inter-token gap against the plain row's."""
    asyncio.run(run_level(url, min(2, max(levels)), 2, max_tokens, strategy, time_limit))
    rows = []
    for clients in levels:
        row = asyncio.run(run_level(url, clients, requests, max_tokens, strategy, time_limit))
        if rows and rows[0]["clients"] == 1 and rows[0]["tokens_per_second"] > 0:
            row["speedup_vs_1_client"] = round(
                row["tokens_per_second"] / rows[0]["tokens_per_second"], 2)
        elif clients == 1:
            row["speedup_vs_1_client"] = 1.0
        rows.append(row)
        progress(json.dumps(row))
    result = {"url": url, "strategy": strategy, "max_tokens": max_tokens,
              "requests_per_level": requests, "levels": rows}
    if long_prompt_tokens:
        plain = max(rows, key=lambda r: r["clients"])
        row = asyncio.run(run_level(url, plain["clients"] - 1, requests, max_tokens, strategy,
                                    time_limit, long_prompt_tokens))
        row["p95_inter_token_vs_plain"] = round(
            row["p95_inter_token_s"] / plain["p95_inter_token_s"], 2)
        progress(json.dumps(row))
        result["long_prompt_level"] = row
    return result


def bench_serve(
    clients: Annotated[str, typer.Option(help="Concurrency levels, e.g. 1,4,8,16.")
                       ] = "1,4,8,16",
    requests: Annotated[int, typer.Option(help="Requests per level.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="New tokens per request (EOS ignored).")
                          ] = 32,
    strategy: Annotated[str, typer.Option()] = "pad",
    url: Annotated[str | None, typer.Option(help="Bench a running server instead.")] = None,
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    dtype: DtypeOption = "float32",
    max_batch_size: Annotated[int | None, typer.Option(
        help="Of the server started here (default: the largest level).")] = None,
    time_limit: Annotated[float, typer.Option(help="Seconds per level at most.")] = 300.0,
    engine: Annotated[str, typer.Option(
        help="Engine(s) of the server started here, e.g. hf,vllm: each is started in turn, "
             "with the same clients, and compared in one table.")] = "hf",
    long_prompt_tokens: Annotated[int, typer.Option(
        help="Also run the largest level with one client sending prompts of about this many "
             "tokens (0: not): the ordinary clients' p95 inter-token gap beside it.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    record: Annotated[Path | None, typer.Option(
        help="Also write the run as machine JSON (command, commit, machine, versions, "
             "every level) to this file, atomically.")] = None,
) -> None:
    """Throughput, latency and time to first token of `padlm serve` per concurrency level."""
    from rich.console import Console

    try:
        levels = [int(c) for c in clients.split(",") if c.strip()]
    except ValueError:
        raise PadlmError(f"--clients must be integers, got {clients!r}") from None
    if not levels or min(levels) < 1 or requests < 1 or max_tokens < 1 or time_limit <= 0:
        raise PadlmError("--clients, --requests and --max-tokens must be >= 1, --time-limit > 0")
    if long_prompt_tokens < 0 or (long_prompt_tokens and max(levels) < 2):
        raise PadlmError("--long-prompt-tokens needs a level of 2 clients or more (one of "
                         "them sends the long prompts)")
    from padlm.devices import check_engine

    engines = [check_engine(name.strip()) for name in engine.split(",") if name.strip()]
    if not engines or (url is not None and len(engines) > 1):
        raise PadlmError("--engine names one engine or more (hf,vllm), and one only with --url")
    if strategy_class(strategy).spec.level == "sequence":
        raise PadlmError(f"bench serve streams; {strategy} picks whole sequences and cannot "
                         "stream")
    console = Console(stderr=True)

    def progress(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    results = {}
    for name in engines:
        with contextlib.ExitStack() as stack:
            target = url
            if target is None:
                progress(f"starting padlm serve --engine {name} on loopback ...")
                target = stack.enter_context(local_server(model, persrm, dtype,
                                                          max_batch_size or max(levels), name))
            results[name] = {"engine": name, **run_bench(target.rstrip("/"), levels, requests,
                                                         max_tokens, strategy, time_limit,
                                                         progress, long_prompt_tokens)}
    if record is not None:
        from padlm.bench import machine_provenance, write_record
        from padlm.devices import AUTO, resolve_device

        write_record(record, {**machine_provenance(resolve_device(AUTO)), "model": model,
                              "persrm": persrm, "dtype": dtype, "results": results})
        progress(f"recorded to {record}")
    if as_json:
        print(json.dumps(results[engines[0]] if len(engines) == 1 else results, indent=2))
    elif len(engines) == 1:
        print(markdown_table(results[engines[0]]))
    else:
        print(engines_table(results))
