"""The HTTP gate: what every request passes before a handler sees it, and what it leaves.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which would buffer streams and
hide client disconnects from the handlers). In order:

- ``X-Request-Id``: the client's (if it is a sane token) or a new one, echoed on the response
  and written into the access log line;
- ``Host`` must be an allowed name, so a DNS-rebinding page cannot talk to a loopback server
  under its own domain;
- with an API key, every ``/v1`` route needs ``Authorization: Bearer <key>`` (compared in
  constant time);
- a POST must say ``Content-Type: application/json``: the content types a web page may send
  cross-origin without a preflight (``text/plain``, form encodings) are refused with a 415, so
  a page cannot make a visitor's browser run decodes on their local server;
- one structured access log line per response, and ``http_requests_total`` by status: the
  status sent, 500 for a handler's exception (answered outside the gate) and 499 for a
  request cancelled before it answered, never 0.

Below the ASGI layer, :class:`TimedH11Protocol` closes connections whose request head does
not arrive in time, which uvicorn does not do on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import uuid

import h11
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from padlm.server.metrics import ServerMetrics
from padlm.server.schemas import ApiError
from padlm.server.settings import ServerSettings

access_log = logging.getLogger("padlm.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

PUBLIC_TENANT = "public"  # the one namespace of a server without API keys
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its response
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def tenant_of(key: str) -> str:
    """The namespace of an API key's profiles, named without the key (exports, logs and
    ``padlm profile --tenant`` show this): the first 16 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def error_response(error: ApiError) -> JSONResponse:
    """The OpenAI error shape, with the error's headers (``Retry-After``, ...). Starlette's
    ``JSONResponse`` serialises with ``allow_nan=False``, like :func:`padlm.server.app.dumps`."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def host_name(host: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class Gate:
    """See the module docstring; ``routes`` are the app's path templates (metric labels)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics,
                 routes: frozenset[str]) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.routes = routes
        self.keys = [(key.encode(), tenant_of(key)) for key in settings.api_keys]
        self.hosts = (None if settings.allowed_hosts is None
                      else {host_name(h) for h in settings.allowed_hosts})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        began, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self.refusal(scope, headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # the request's task was cancelled (its client left, or the server stopped it)
            status = status or CLIENT_CLOSED
            raise
        except Exception:
            # Starlette's outermost middleware turns this into the 500 the client gets,
            # outside the gate: record what it will send, not "no response"
            status = status or 500
            raise
        finally:
            self.record(scope, request_id, status, time.perf_counter() - began)

    def refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        if self.hosts is not None and "*" not in self.hosts and host_name(
                headers.get("host", "")) not in self.hosts:
            return ApiError(400, "invalid Host header; the server answers to "
                            f"{', '.join(sorted(self.hosts))} (--allowed-hosts)",
                            code="invalid_host")
        if self.keys and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            # every key compared (in constant time each): the time taken says nothing of
            # which key, if any, was close
            matches = [tenant for key, tenant in self.keys
                       if hmac.compare_digest(token.strip().encode(), key)]
            if matches and scheme.lower() == "bearer":
                scope["state"]["tenant"] = matches[0]
            else:
                return ApiError(401, "invalid or missing API key: send Authorization: "
                                "Bearer <key>", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"Content-Type must be application/json, got "
                                f"{media or 'none'}", code="unsupported_media_type")
        return None

    def record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        handler = getattr(route, "path", None) or (
            scope["path"] if scope["path"] in self.routes else "other")
        # a label per method a client can invent would grow /metrics without bound
        method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
        self.metrics.http.labels(method, handler, str(status)).inc()
        client = scope.get("client")
        access_log.info(json.dumps({
            "event": "http", "request_id": request_id, "method": scope["method"],
            "path": scope["path"], "status": status, "seconds": round(seconds, 4),
            "client": client[0] if client else None}))


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a header timeout, which uvicorn lacks: its keep-alive
    timer only runs between a response and the next byte, so a connection that never sends
    a byte, or sends half a request head and then one byte now and then, stays open for
    ever. Here each request head must be complete within ``header_timeout_s`` of the
    connection opening (or of the previous response), else the connection closes. Bodies
    are timed by the handlers (``padlm.server.app.read_body``), which answer with a 408."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: object = None  # the cycle in place when the timer was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._cancel_header_timer()  # a new request's head is complete

    def on_response_complete(self) -> None:
        # armed first: the super call may start a pipelined request at once, which then
        # shows as a new cycle when the timer fires
        self._arm_header_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self._waiting_after = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout_s,
                                                      self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()
