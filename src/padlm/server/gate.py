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
- one structured access log line per response, and ``http_requests_total`` by status.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from padlm.server.metrics import ServerMetrics
from padlm.server.schemas import ApiError
from padlm.server.settings import ServerSettings

access_log = logging.getLogger("padlm.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def error_response(error: ApiError) -> JSONResponse:
    """The OpenAI error shape, with the error's headers (``Retry-After``, ...)."""
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
        self.key = settings.api_key.encode() if settings.api_key else None
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
        finally:
            self.record(scope, request_id, status, time.perf_counter() - began)

    def refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        if self.hosts is not None and "*" not in self.hosts and host_name(
                headers.get("host", "")) not in self.hosts:
            return ApiError(400, "invalid Host header; the server answers to "
                            f"{', '.join(sorted(self.hosts))} (--allowed-hosts)",
                            code="invalid_host")
        if self.key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.key):
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
