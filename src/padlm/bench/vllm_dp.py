"""PAD on vLLM's own data parallelism: ``padlm bench vllm-dp``.

padlm's server drives vLLM's synchronous engine, which runs one engine core; vLLM balances
requests over several engine replicas (``--data-parallel-size N``) in its own OpenAI server.
So data parallelism runs there: vLLM's server with padlm's plugin flags
(:meth:`VllmPersonalizer.server_args`) and N replicas, each loading padlm's plugin and PAD
processor in its own engine process. This module starts that server for each N, sends the
same concurrent, mixed-preference PAD requests (greedy, a fixed number of tokens), reports
tokens/s and latency per N, and checks every N returned the same tokens.

On a CPU each replica gets its own share of the cores (``VLLM_CPU_OMP_THREADS_BIND`` split
with ``|``, one group per replica) and its own KV cache of ``VLLM_CPU_KVCACHE_SPACE``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

import httpx

from padlm.bench.kit import Stopwatch, render_table, with_ratio_to_first
from padlm.bench.serve import (
    BENCH_PREFERENCES,
    BENCH_PROMPTS,
    Sample,
    free_port,
    running_server,
    share_requests,
    summarize,
)
from padlm.core.config import GenerationConfig
from padlm.core.decoding import Request
from padlm.core.preferences import parse_preference
from padlm.errors import PadlmError
from padlm.vllm.engine import cpu_kv_cache_gib

WEIGHTS = (1.0, 2.0)  # per-request PAD weights, alternating: rows differ in more than text


def replica_binding(replicas: int, cores: Sequence[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``replicas`` engine replicas: the cores split into
    that many contiguous groups (vLLM's ``|`` separates the replicas' lists).

    >>> replica_binding(2, [0, 1, 2, 3])
    '0-1|2-3'
    >>> replica_binding(2, [0, 1])
    '0|1'
    """
    cores = sorted(cores)
    if not 1 <= replicas <= len(cores):
        raise PadlmError(f"{replicas} replicas need as many CPU cores; this machine lets "
                         f"padlm use {len(cores)}")
    size = len(cores) // replicas
    groups = [cores[i * size:(i + 1) * size] for i in range(replicas)]
    return "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def replica_environment(replicas: int, on_cpu: bool) -> dict[str, str]:
    """What the server's processes need beyond the caller's environment: on a CPU, each
    replica's cores (unless the user bound them) and a KV cache that fits all replicas."""
    if not on_cpu:
        return {}
    env = {}
    bound = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if bound is None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = replica_binding(replicas,
                                                           sorted(os.sched_getaffinity(0)))
    elif bound not in ("auto", "nobind") and bound.count("|") + 1 != replicas:
        # vLLM gives each replica one '|'-separated list; a list short is an engine that
        # dies at start-up with an index error
        raise PadlmError(f"VLLM_CPU_OMP_THREADS_BIND={bound!r} binds {bound.count('|') + 1} "
                         f"engine(s) but {replicas} replicas need one core list each, "
                         "separated by '|'; unset it to split this machine's cores")
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib(replicas))
    return env


def server_command(engine, replicas: int, port: int) -> list[str]:
    """vLLM's OpenAI server with padlm's plugin flags and ``replicas`` engine replicas."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine.server_args(),
            "--data-parallel-size", str(replicas), "--host", "127.0.0.1", "--port", str(port),
            "--disable-log-stats"]


def pad_requests(count: int, max_tokens: int) -> list[Request]:
    """The benchmark's requests: mixed prompts, preferences and PAD weights, exactly
    ``max_tokens`` tokens each."""
    return [Request(BENCH_PROMPTS[i % len(BENCH_PROMPTS)],
                    parse_preference(BENCH_PREFERENCES[i % len(BENCH_PREFERENCES)]),
                    GenerationConfig(max_new_tokens=max_tokens, weight=WEIGHTS[i % len(WEIGHTS)],
                                     ignore_eos=True))
            for i in range(count)]


def completion_body(engine, request: Request) -> dict:
    """A greedy PAD request as vLLM's server takes it: padlm's rendered context as token
    ids, the PAD weight in ``vllm_xargs``."""
    config = request.config
    return {"model": engine.path, "prompt": engine.prompt_ids(request, "pad"),
            "max_tokens": config.max_new_tokens, "temperature": 0,
            "ignore_eos": config.ignore_eos, "return_token_ids": True,
            "vllm_xargs": {"padlm_weight": config.weight}}


async def _complete(client: httpx.AsyncClient, url: str, body: dict
                    ) -> tuple[Sample, list[int] | None]:
    clock = Stopwatch()
    try:
        response = await client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as error:
        return Sample(False, clock.elapsed(), error=repr(error)), None
    latency = clock.elapsed()
    if response.status_code != 200:
        return Sample(False, latency, error=f"{response.status_code}: {response.text[:200]}"), None
    tokens = response.json()["choices"][0]["token_ids"]
    return Sample(True, latency, tokens=len(tokens)), tokens


async def run_completions(url: str, bodies: Sequence[dict], clients: int
                          ) -> tuple[dict, list[list[int] | None]]:
    """``clients`` concurrent loops share the requests; the level's summary and each
    request's tokens, in request order."""
    samples: list[Sample] = []
    outputs: list[list[int] | None] = [None] * len(bodies)
    clock = Stopwatch()
    async with httpx.AsyncClient(timeout=httpx.Timeout(900)) as client:
        async def send(index: int) -> None:
            sample, outputs[index] = await _complete(client, url, bodies[index])
            samples.append(sample)

        await share_requests(clients, len(bodies), send)
    return summarize(clients, samples, clock.elapsed()), outputs


def bench_replicas(engine, replicas: Sequence[int], clients: int, requests: int,
                   max_tokens: int, on_cpu: bool, progress=lambda line: None) -> dict:
    """Each replica count in turn, the same requests; ratios are to the first count."""
    bodies = [completion_body(engine, r) for r in pad_requests(requests, max_tokens)]
    levels, outputs = [], []
    for count in replicas:
        port = free_port()
        progress(f"starting vLLM's server with {count} replica(s) ...")
        clock = Stopwatch()
        with running_server(server_command(engine, count, port), f"http://127.0.0.1:{port}",
                            replica_environment(count, on_cpu)) as url:
            startup = clock.elapsed()
            asyncio.run(run_completions(url, bodies[:2], 2))  # warm-up
            summary, tokens = asyncio.run(run_completions(url, bodies, clients))
        timed = {k: v for k, v in summary.items() if "ttft" not in k}  # not streamed
        levels.append({"replicas": count, "startup_seconds": round(startup, 1), **timed})
        outputs.append(tokens)
        progress(str(levels[-1]))
    return {"strategy": "pad", "clients": clients, "requests": requests,
            "max_tokens": max_tokens,
            "levels": with_ratio_to_first(levels, "tokens_per_second", "vs_first"),
            "same_tokens": all(o == outputs[0] for o in outputs)}


def replicas_table(result: dict) -> str:
    table = render_table(
        ("replicas", "requests", "errors", "tokens/s", "vs first", "p50 latency s",
         "p95 latency s", "start-up s"),
        ((r["replicas"], r["requests"], r["errors"], r["tokens_per_second"], f"{r['vs_first']}x",
          r["p50_latency_s"], r["p95_latency_s"], r["startup_seconds"])
         for r in result["levels"]))
    return f"{table}\n\nsame tokens at every replica count: {result['same_tokens']}"
