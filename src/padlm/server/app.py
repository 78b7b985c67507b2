"""The OpenAI-compatible app, and the uvicorn server that drains it on SIGTERM.

:func:`create_app` wires one served model's pieces together: the
:class:`~padlm.server.planning.Planner`, the decode :class:`~padlm.server.worker.BatchWorker`
reporting to :class:`~padlm.server.metrics.ServerMetrics`, the routes of
:mod:`padlm.server.routes` and, in front of them, :mod:`padlm.server.gate`, which checks host,
key and content type first. :class:`PadlmServer` drains the worker on SIGTERM.

Choices made where OpenAI's API and padlm differ (documented in docs/serving.md):
- ``temperature`` defaults to 0 (greedy, PAD's released setting), not OpenAI's 1.0.
- ``/v1/completions`` renders each prompt as one user turn of the chat template, like chat.
- ``model`` may be left out (the served model answers); a name it is not served under is a 404.
- a stream that fails or is cut by shutdown ends with an error event, then ``[DONE]``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from padlm.engines import Engine
from padlm.profiles.service import ProfileService
from padlm.server.gate import Gate, TimedH11Protocol
from padlm.server.metrics import ServerMetrics
from padlm.server.planning import Planner
from padlm.server.routes import EXCEPTION_HANDLERS, Service, router
from padlm.server.settings import ServerSettings
from padlm.server.worker import BatchWorker

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 5  # after the drain, connections get this long to send their last bytes


def create_app(engine: Engine, settings: ServerSettings | None = None,
               profiles: ProfileService | None = None, **fields) -> FastAPI:
    """The FastAPI app; its decode worker starts and stops with the app's lifespan.
    ``fields`` override single settings: ``create_app(engine, max_batch_size=4)``.
    ``profiles``: where users' profiles live (None: requests' ``user`` is not learned
    from, and the profile routes answer 404)."""
    settings = replace(settings or ServerSettings(), **fields)
    served = engine.served_model()
    # a model loaded from a directory is named by its path: answer to the last part only
    # (no response may show the server's file system)
    own = served.name
    names = settings.served_model_names or (Path(own).name if Path(own).is_absolute() else own,)
    metrics = ServerMetrics(names[0])
    worker = BatchWorker(engine, settings, observer=metrics)
    metrics.watch(worker.snapshot)
    service = Service(engine, settings, served, names,
                      Planner(engine, settings, served, profiles), worker, metrics, profiles)

    app = FastAPI(title="padlm", version="0.1.0", lifespan=_lifespan, docs_url="/docs",
                  exception_handlers=EXCEPTION_HANDLERS)
    app.state.service = service
    app.include_router(router)
    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(Gate, settings=settings, metrics=metrics, routes=routes)
    if settings.cors_origins:  # outermost: preflights are answered before the gate
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    service.worker.start()
    try:
        yield
    finally:
        service.worker.stop()
        service.planner.pool.shutdown(wait=False, cancel_futures=True)


class PadlmServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM/SIGINT draining the decode worker before the usual
    shutdown: new requests get a 503, running rows finish for up to ``drain_timeout_s``, then
    every open request ends (streams with an error event and ``[DONE]``, others with a 503
    body), and only then does uvicorn close the connections. A second signal stops at once.
    ``on_exit`` runs once uvicorn has shut down: after a signal uvicorn re-raises it to end
    the process, so code after :meth:`run` never runs then, and what must be released
    (vLLM's engine processes) is released here."""

    def __init__(self, config: uvicorn.Config, service: Service,
                 on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.service = service
        self.worker = service.worker
        self.draining = False
        self.on_exit = on_exit

    async def shutdown(self, sockets=None) -> None:
        self.service.closing.set()  # unfinished uploads answer 503 now (see routes.read_body)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        threading.Thread(target=self._drain_then_exit, args=(sig,), name="padlm-drain",
                         daemon=True).start()

    def _drain_then_exit(self, sig: int) -> None:
        log.info("draining: finishing running requests for up to %g s",
                 self.worker.settings.drain_timeout_s)
        self.worker.drain()
        super().handle_exit(sig, None)


def make_server(app: FastAPI, host: str, port: int, log_level: str = "info",
                on_exit: Callable[[], None] | None = None) -> PadlmServer:
    """A :class:`PadlmServer` for ``app`` (the gate writes the access log, not uvicorn), with
    the settings' connection limits: uvicorn's own (connections, keep-alive, header size)
    and the header timeout of :class:`~padlm.server.gate.TimedH11Protocol`, which uvicorn
    lacks (the body timeout is :func:`~padlm.server.routes.read_body`'s)."""
    service = app.state.service
    settings = service.settings
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_FLUSH_S, limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        http=functools.partial(TimedH11Protocol, header_timeout_s=settings.header_timeout_s))
    return PadlmServer(config, service, on_exit)


class ServerThread:
    """Run the app with uvicorn in a background thread (tests, notebooks, ``bench serve``).

    >>> with ServerThread(create_app(engine)) as server:          # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.server = make_server(app, host, port, log_level)
        self.model = app.state.service.names[0]  # the name requests use
        self.thread = threading.Thread(target=self.server.run, name="padlm-uvicorn",
                                       daemon=True)
        self.host = host
        self.port = port

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
