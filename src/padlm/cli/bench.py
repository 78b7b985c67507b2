"""``padlm bench``: the commands only; the timing lives in :mod:`padlm.bench` (loaded on use,
so ``padlm --help`` does not import torch)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli.options import (
    DeviceOption,
    DtypeOption,
    ExpertsOption,
    GuideAlignmentOption,
    ModelOption,
    PersRMOption,
    ReferenceOption,
    SamplerOption,
    SamplerPlacementOption,
    invocation,
)
from padlm.errors import PadlmError
from padlm.server.settings import split_list

log = logging.getLogger(__name__)
app = typer.Typer(help="Benchmarks: decoding strategies (default) and the server.",
                  invoke_without_command=True, no_args_is_help=False)


@app.callback()
def bench_command(
    ctx: typer.Context,
    strategies: Annotated[str, typer.Option(
        help="Comma-separated rows to time (strategies and variants such as pad-lora), or "
             "'all'; an unknown name lists the choices.")] = "all",
    batch_size: Annotated[str, typer.Option(help="One or more, e.g. 1,8.")] = "1",
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    repeats: Annotated[int, typer.Option()] = 3,
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    reference: ReferenceOption = None,
    guide_alignment: GuideAlignmentOption = "auto",
    top_k: Annotated[int | None, typer.Option(
        help="The guided strategies' candidates per step (default: each one's own).")] = None,
    experts: ExpertsOption = "default",
    dtype: DtypeOption = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    record: Annotated[Path | None, typer.Option(
        help="Also write the run as machine JSON (command, commit, device, dtype, threads, "
             "versions, guide fingerprints, every row) to this file, atomically.")] = None,
) -> None:
    """Time each decoding strategy on the same prompt, in one run, as ratios to base."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from padlm.bench.kit import write_record
    from padlm.bench.strategies import BENCH_STRATEGIES, bench, markdown_table
    from padlm.core.engine import Personalizer

    try:
        sizes = [int(s) for s in batch_size.split(",")]
    except ValueError:
        raise PadlmError(f"--batch-size must be integers, got {batch_size!r}") from None
    if min(sizes) < 1 or repeats < 1 or max_new_tokens < 1:
        raise PadlmError("--batch-size, --repeats and --max-new-tokens must be >= 1")
    console = Console(stderr=True)
    engine = Personalizer(model, persrm=persrm, dtype=dtype, device=device,
                          components={"experts": experts}, reference=reference,
                          guide_alignment=guide_alignment)
    chosen = (list(BENCH_STRATEGIES) if strategies == "all"
              else [s.strip() for s in strategies.split(",") if s.strip()])
    result = bench(engine, chosen, sizes, max_new_tokens, repeats,
                   progress=lambda line: console.print(line), top_k=top_k)
    if record is not None:
        write_record(record, {"repeats": repeats, **result})
        console.print(f"recorded to {record}")
    print(json.dumps(result, indent=2) if as_json else markdown_table(result))


@app.command("table")
def bench_table(record: Annotated[Path, typer.Argument(
        help="A file written by padlm bench --record.")]) -> None:
    """Print a recorded run as the reports' markdown table (one line per strategy)."""
    from padlm.bench.strategies import record_table

    try:
        data = json.loads(record.read_text())
        print(record_table(data))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise PadlmError(f"{record} is not a padlm bench --record file: {error}") from None


@app.command("vllm-dp")
def bench_vllm_dp(
    replicas: Annotated[str, typer.Option(
        help="Engine replica counts to run in turn (vLLM's --data-parallel-size), e.g. 1,2.")
                        ] = "1,2",
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 8,
    requests: Annotated[int, typer.Option(help="Requests per replica count.")] = 32,
    max_tokens: Annotated[int, typer.Option(help="New tokens per request (EOS ignored).")
                          ] = 32,
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    dtype: DtypeOption = "float32",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """PAD on vLLM's own OpenAI server with 1..N data-parallel engine replicas: tokens/s and
    latency per count, in one run, and whether every count returned the same tokens."""
    from rich.console import Console

    from padlm.bench.vllm_dp import bench_replicas, replicas_table
    from padlm.core.config import GenerationConfig
    from padlm.core.devices import AUTO, resolve_device
    from padlm.vllm.engine import VllmPersonalizer, require_vllm

    try:
        counts = [int(r) for r in replicas.split(",") if r.strip()]
    except ValueError:
        raise PadlmError(f"--replicas must be integers, got {replicas!r}") from None
    if not counts or min(counts) < 1 or clients < 1 or requests < 1 or max_tokens < 1:
        raise PadlmError("--replicas, --clients, --requests and --max-tokens must be >= 1")
    require_vllm()
    engine = VllmPersonalizer(model, persrm=persrm, dtype=dtype)
    engine.check("pad", GenerationConfig())  # a PersRM this engine cannot run is refused
    console = Console(stderr=True)
    result = bench_replicas(engine, counts, clients, requests, max_tokens,
                            resolve_device(AUTO).type == "cpu",
                            progress=lambda line: console.print(line, highlight=False))
    print(json.dumps(result, indent=2) if as_json else replicas_table(result))


@app.command("sampler")
def bench_sampler(
    sampler: SamplerOption = "qwen2.5-coder-1.5b-instruct",
    engine: Annotated[str, typer.Option(
        help="Engines to time in turn, e.g. hf,vllm; ratios are to the first.")] = "hf,vllm",
    requests: Annotated[int, typer.Option(help="Build requests decoded together.")] = 32,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option()] = 0.7,
    seed: Annotated[int, typer.Option()] = 0,
    record: Annotated[Path | None, typer.Option(
        help="A build's output JSONL: its build record (<stem>.build.json) keeps the result "
             "as engine_comparison.")] = None,
    pool_dir: Annotated[Path | None, typer.Option(help="Directory with the prompt pools.")
                        ] = None,
    placement: SamplerPlacementOption = None,
    dtype: Annotated[str, typer.Option()] = "bfloat16",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A local sampler's tokens/s on each engine, the same build requests, in one run."""
    from padlm.bench.sampler import (
        bench_requests,
        comparison_record,
        comparison_table,
        time_sampler,
        with_ratios,
    )
    from padlm.core.devices import check_engine
    from padlm.data.build import update_record
    from padlm.data.pools import default_pool_dir
    from padlm.data.samplers import SamplingSettings, is_endpoint, open_sampler

    engines = [check_engine(name) for name in split_list(engine)]
    if not engines:
        raise PadlmError("--engine names one engine or more, e.g. hf,vllm")
    if is_endpoint(sampler):
        raise PadlmError("bench sampler times local engines; an endpoint's speed is its "
                         "server's (padlm bench serve --url)")
    if requests < 1 or max_new_tokens < 1:
        raise PadlmError("--requests and --max-new-tokens must be >= 1")
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    batch = bench_requests(pool_dir or default_pool_dir(), requests, seed, temperature)
    results = []
    for name in engines:
        log.info("timing %s on the %s engine (%d requests)", sampler, name, len(batch))
        results.append(time_sampler(
            lambda name=name: open_sampler(sampler, placement, dtype, engine=name), batch,
            settings))
    results = with_ratios(results)
    if record is not None:
        path = update_record(record, "engine_comparison", comparison_record(
            results, invocation(), settings, temperature))
        log.info("recorded in %s", path)
    typer.echo(json.dumps(results, indent=2) if as_json else comparison_table(results))


@app.command("serve")
def bench_serve(
    clients: Annotated[str, typer.Option(help="Concurrency levels, e.g. 1,4,8,16.")
                       ] = "1,4,8,16",
    requests: Annotated[int, typer.Option(help="Requests per level.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="New tokens per request (EOS ignored).")
                          ] = 32,
    strategy: Annotated[str, typer.Option(
        help="Of every request, with profiles too (they then state no preference: a fresh "
             "profile decodes this strategy toward the empty preference, a learned one toward "
             "its sides), so both runs of --profiles both decode alike.")] = "pad",
    profiles: Annotated[str, typer.Option(
        help="off: no users (the server keeps no profiles); on: client c is user "
             "bench-user-c, whose requests decode for their profile (a fresh SQLite store), "
             "and who rates each answer up, down, in turn before the next request; both: off "
             "then on, the same clients and requests, with on's tokens/s over off's per "
             "level.")] = "off",
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
    """Throughput, latency and time to first token of `padlm serve` per concurrency level;
    with --profiles both, what users' profiles and their feedback cost it, in one run."""
    from padlm.bench.kit import machine_provenance, progress_printer, write_record
    from padlm.bench.serve import local_server, run_bench, runs_report
    from padlm.core.registry import strategy_class

    try:
        levels = [int(c) for c in clients.split(",") if c.strip()]
    except ValueError:
        raise PadlmError(f"--clients must be integers, got {clients!r}") from None
    if not levels or min(levels) < 1 or requests < 1 or max_tokens < 1 or time_limit <= 0:
        raise PadlmError("--clients, --requests and --max-tokens must be >= 1, --time-limit > 0")
    if long_prompt_tokens < 0 or (long_prompt_tokens and max(levels) < 2):
        raise PadlmError("--long-prompt-tokens needs a level of 2 clients or more (one of "
                         "them sends the long prompts)")
    from padlm.core.devices import check_engine

    engines = [check_engine(name.strip()) for name in engine.split(",") if name.strip()]
    if not engines or (url is not None and len(engines) > 1):
        raise PadlmError("--engine names one engine or more (hf,vllm), and one only with --url")
    spec = strategy_class(strategy).spec
    if spec.level == "sequence":
        raise PadlmError(f"bench serve streams; {strategy} picks whole sequences and cannot "
                         "stream")
    modes = {"off": [False], "on": [True], "both": [False, True]}.get(profiles)
    if modes is None:
        raise PadlmError(f"--profiles is off, on or both, got {profiles!r}")
    if len(modes) > 1 and (url is not None or len(engines) > 1):
        raise PadlmError("--profiles both starts its own server twice, on one engine: not "
                         "with --url or several engines")
    if True in modes and (spec.uses_experts or spec.uses_scorer):
        raise PadlmError(f"{strategy} needs a stated preference, which a fresh profile does "
                         "not have; bench profiles with e.g. pad, prompt or base")
    progress = progress_printer()
    results = {}
    for name in engines:
        for profiled in modes:
            with contextlib.ExitStack() as stack:
                target = url
                if target is None:
                    progress(f"starting padlm serve --engine {name} "
                             f"{'with' if profiled else 'without'} profiles on loopback ...")
                    target = stack.enter_context(local_server(
                        model, persrm, dtype, max_batch_size or max(levels), name, profiled))
                results[name + ("+profiles" if profiled and len(modes) > 1 else "")] = {
                    "engine": name, **run_bench(target.rstrip("/"), levels, requests,
                                                max_tokens, strategy, time_limit, progress,
                                                long_prompt_tokens, profiled)}
    if record is not None:
        from padlm.core.devices import AUTO, resolve_device

        write_record(record, {**machine_provenance(resolve_device(AUTO)), "model": model,
                              "persrm": persrm, "dtype": dtype, "results": results})
        progress(f"recorded to {record}")
    if as_json:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else results,
                         indent=2))
    else:
        print(runs_report(results))
