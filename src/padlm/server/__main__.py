"""``python -m padlm.server [options]``: the same as ``padlm serve`` (used by bench serve)."""

import logging
import sys

import typer

from padlm.errors import PadlmError
from padlm.server.cli import serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command()(serve)
    try:
        app()
    except PadlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
