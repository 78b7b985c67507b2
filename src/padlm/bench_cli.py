"""``padlm bench``: the command only; the timing lives in :mod:`padlm.bench` (loaded on use,
so ``padlm --help`` does not import torch)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from padlm.cli_options import DeviceOption, DtypeOption, ExpertsOption, ModelOption
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
    experts: ExpertsOption = "default",
    dtype: DtypeOption = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Time each decoding strategy on the same prompt, in one run, as ratios to base."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from padlm.bench import BENCH_STRATEGIES, bench, markdown_table
    from padlm.engine import Personalizer

    try:
        sizes = [int(s) for s in batch_size.split(",")]
    except ValueError:
        raise PadlmError(f"--batch-size must be integers, got {batch_size!r}") from None
    if min(sizes) < 1 or repeats < 1 or max_new_tokens < 1:
        raise PadlmError("--batch-size, --repeats and --max-new-tokens must be >= 1")
    console = Console(stderr=True)
    engine = Personalizer(model, dtype=dtype, device=device, experts=experts)
    chosen = (list(BENCH_STRATEGIES) if strategies == "all"
              else [s.strip() for s in strategies.split(",") if s.strip()])
    result = bench(engine, chosen, sizes,
                   max_new_tokens, repeats, progress=lambda line: console.print(line))
    print(json.dumps(result, indent=2) if as_json else markdown_table(result))
