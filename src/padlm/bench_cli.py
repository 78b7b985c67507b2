"""``padlm bench``: the command only; the timing lives in :mod:`padlm.bench` (loaded on use,
so ``padlm --help`` does not import torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli_options import (
    DeviceOption,
    DtypeOption,
    ExpertsOption,
    ModelOption,
    PersRMOption,
    ReferenceOption,
)
from padlm.errors import PadlmError

bench_app = typer.Typer(help="Benchmarks: decoding strategies (default) and the server.",
                        invoke_without_command=True, no_args_is_help=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.callback()
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

    from padlm.bench import BENCH_STRATEGIES, bench, markdown_table, write_record
    from padlm.engine import Personalizer

    try:
        sizes = [int(s) for s in batch_size.split(",")]
    except ValueError:
        raise PadlmError(f"--batch-size must be integers, got {batch_size!r}") from None
    if min(sizes) < 1 or repeats < 1 or max_new_tokens < 1:
        raise PadlmError("--batch-size, --repeats and --max-new-tokens must be >= 1")
    console = Console(stderr=True)
    engine = Personalizer(model, persrm=persrm, dtype=dtype, device=device, experts=experts,
                          reference=reference)
    chosen = (list(BENCH_STRATEGIES) if strategies == "all"
              else [s.strip() for s in strategies.split(",") if s.strip()])
    result = bench(engine, chosen, sizes,
                   max_new_tokens, repeats, progress=lambda line: console.print(line))
    if record is not None:
        write_record(record, {"repeats": repeats, **result})
        console.print(f"recorded to {record}")
    print(json.dumps(result, indent=2) if as_json else markdown_table(result))


@bench_app.command("table")
def bench_table(record: Annotated[Path, typer.Argument(
        help="A file written by padlm bench --record.")]) -> None:
    """Print a recorded run as the reports' markdown table (one line per strategy)."""
    from padlm.bench import record_table

    try:
        data = json.loads(record.read_text())
        print(record_table(data))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise PadlmError(f"{record} is not a padlm bench --record file: {error}") from None


@bench_app.command("vllm-dp")
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

    from padlm.config import GenerationConfig
    from padlm.devices import AUTO, resolve_device
    from padlm.vllm.engine import VllmPersonalizer, require_vllm
    from padlm.vllm.scaleout import bench_replicas, replicas_table

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
