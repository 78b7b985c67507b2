"""``padlm bench sampler``: a teacher's sampling speed on each engine, measured in one run.

The build record already keeps each run's tokens/s, but runs differ in batch size, prompts
and machine load, so their numbers do not compare engines. This times the same requests (a
build's own ``sample``-mode requests, seeded as the build seeds them) on each engine in turn,
in one process, after a warm-up, and reports each engine's tokens/s as a ratio to the first.
Start-up (model load, vLLM's compilation) is reported apart: a build pays it once per run.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from padlm.bench.kit import Stopwatch, render_table, with_ratio_to_first
from padlm.data.axes import AXES
from padlm.data.build import HH_PROMPT_SHARE, generation_pool, sample_request
from padlm.data.samplers import Sampler, SampleRequest, SamplingSettings

WARMUP_REQUESTS = 2


def bench_requests(pool_dir: Path, count: int, seed: int, temperature: float,
                   axis: str = "P2") -> list[SampleRequest]:
    """``count`` requests of a build: both sides of ``axis`` on the first prompts of the
    generation pool."""
    sides = (AXES[axis].a.id, AXES[axis].b.id)
    pool = generation_pool(pool_dir, seed, HH_PROMPT_SHARE, limit=(count + 1) // 2)
    requests = [sample_request(prompt, side, seed, temperature)
                for prompt in pool for side in sides]
    return requests[:count]


def time_sampler(open_sampler: Callable[[], Sampler], requests: Sequence[SampleRequest],
                 settings: SamplingSettings) -> dict:
    """Open a sampler, warm it up, then time one call over every request (the engine
    batches them as a build's chunk is batched)."""
    clock = Stopwatch()
    sampler = open_sampler()
    sampler.sample(requests[:WARMUP_REQUESTS], settings)
    startup = clock.elapsed()
    clock = Stopwatch()
    samples = sampler.sample(requests, settings)
    seconds = clock.elapsed()
    tokens = sum(sample.tokens for sample in samples)
    result = {"engine": sampler.engine_name, "sampler": sampler.name,
              "requests": len(requests), "generated_tokens": tokens,
              "seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds, 1),
              "startup_seconds": round(startup, 1)}
    del sampler, samples
    gc.collect()  # the next engine needs the memory
    return result


def with_ratios(results: Sequence[dict]) -> list[dict]:
    """Each engine's tokens/s as a ratio to the first engine's."""
    return with_ratio_to_first(results, "tokens_per_second", f"vs_{results[0]['engine']}")


def comparison_table(results: Sequence[dict]) -> str:
    key = f"vs_{results[0]['engine']}"
    return render_table(
        ("engine", "requests", "tokens", "seconds", "tokens/s", key, "start-up s"),
        ((r["engine"], r["requests"], r["generated_tokens"], r["seconds"],
          r["tokens_per_second"], f"{r[key]:.2f}x", r["startup_seconds"]) for r in results))


def comparison_record(results: Sequence[dict], command: str, settings: SamplingSettings,
                      temperature: float) -> dict:
    """What the build record keeps under ``engine_comparison``."""
    return {"command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "max_new_tokens": settings.max_new_tokens, "temperature": temperature,
            "top_p": settings.top_p, "engines": list(results)}
