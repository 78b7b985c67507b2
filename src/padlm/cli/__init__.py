"""``padlm`` command line: a thin layer over the library, one module per top-level verb.

Every user mistake becomes a one-line ``error: ...`` and exit code 2, never a traceback. The
verb modules import the library inside their commands' bodies (torch, transformers, vLLM),
so building this tree for ``padlm --help`` stays cheap.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from padlm.cli import (
    bench,
    data,
    generate,
    models,
    profile,
    serve,
    strategies,
    train,
    vllm_args,
)
from padlm.cli import eval as evaluation  # not to shadow the builtin
from padlm.errors import PadlmError

app = typer.Typer(
    help="Personalize a frozen LLM at decoding time (PAD, Linear Alignment, ARGS, ...).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
app.command("generate")(generate.generate)
app.command("models")(models.models)
app.command("strategies")(strategies.strategies)
app.add_typer(bench.app, name="bench")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.command("serve")(serve.serve)
app.command("vllm-args")(vllm_args.vllm_args)
app.add_typer(evaluation.app, name="eval")
app.add_typer(profile.app, name="profile")


def main(args: list[str] | None = None) -> None:
    """Run ``padlm`` on ``args`` (default: the command line)."""
    # every command's logs on stderr: stdout is the command's output (`--json` lines, a
    # generation) and must stay parseable; vLLM's own logger is pointed there as it is
    # imported (padlm.vllm.engine.require_vllm)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app(args)
    except PadlmError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False,
                                   soft_wrap=True)
        sys.exit(2)
