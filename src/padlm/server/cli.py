"""``padlm serve`` and ``padlm bench serve``: registered by ``padlm.cli``."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from padlm.cli_options import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    PersRMOption,
    PlacementOption,
)
from padlm.errors import PadlmError


def check_port(host: str, port: int) -> None:
    """Fail with one line, before loading any model, when the address is unusable."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise PadlmError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    placement: PlacementOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Rows decoding together, at most.")
                              ] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond that; more get 429.")
                         ] = 64,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the OpenAI API with per-request preferences (and a playground page at /)."""
    import uvicorn

    from padlm.engine import Personalizer
    from padlm.server.app import GRACEFUL_SHUTDOWN_S, create_app

    if not 0 <= port <= 65535:
        raise PadlmError(f"--port must be in 0..65535, got {port}")
    if max_batch_size < 1 or max_queue < 0:
        raise PadlmError("--max-batch-size must be >= 1 and --max-queue >= 0")
    check_port(host, port)
    engine = Personalizer(model, persrm=persrm, dtype=dtype, placement=placement,
                          device=device)
    app = create_app(engine, max_batch_size=max_batch_size, max_queue=max_queue)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def register(app: typer.Typer) -> None:
    """Add ``padlm serve`` and ``padlm bench serve``."""
    from padlm.bench_cli import bench_app
    from padlm.server.bench import bench_serve

    app.command("serve")(serve)
    bench_app.command("serve")(bench_serve)
