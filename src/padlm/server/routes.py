"""The HTTP routes: each handler reads, plans, queues and hands the rest to an encoder.

Handlers never touch the models: they read and parse the body, have the
:class:`~padlm.server.planning.Planner` check it against the loaded model and the server's
limits (on its own thread), queue its rows as one :class:`~padlm.server.worker.Job`, and
relay what the decode thread sends back through :mod:`padlm.server.replies`. What they share
is the app's :class:`Service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from padlm.core.engine import ServedModel
from padlm.core.preferences import PRESETS
from padlm.engines import Engine
from padlm.profiles.service import ProfileError, ProfileService, ResponseRef
from padlm.server.gate import CLIENT_CLOSED, PUBLIC_TENANT, error_response
from padlm.server.metrics import CONTENT_TYPE, ServerMetrics
from padlm.server.planning import Plan, Planner
from padlm.server.replies import Reply, collect, gather, stream_sse
from padlm.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FeedbackRequest,
    HistoryRequest,
    extra_fields,
    parse_body,
)
from padlm.server.settings import ServerSettings
from padlm.server.worker import BatchWorker, Job

log = logging.getLogger(__name__)

MAX_LOGGED_FIELDS = 10  # unknown request fields named in the log, at most
MAX_LOGGED_FIELD_CHARS = 40
SHUTTING_DOWN = "the server is shutting down"
# the connection closes after these: the rest of the body is never read
_CLOSE = {"Connection": "close"}


@dataclass
class Service:
    """State shared by the handlers (``app.state.service``): one app, one of each."""

    engine: Engine
    settings: ServerSettings
    served: ServedModel
    names: tuple[str, ...]  # the names the model answers to; the first is its own
    planner: Planner
    worker: BatchWorker
    metrics: ServerMetrics
    profiles: ProfileService | None = None
    # set when uvicorn starts shutting down: unfinished uploads then end with a 503
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def persrm_label(self) -> str:
        """The PersRM as responses name it: never a path on the server."""
        served = self.served
        return (Path(served.persrm_path).name if served.persrm_path
                else served.guide or ("identity" if served.persrm else "none"))

    def model_name(self, requested: str | None) -> str:
        """The name to answer under: the requested one if the model is served under it."""
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise ApiError(404, f"the model {requested!r} does not exist; this server serves "
                           f"{', '.join(self.names)}", "model", "model_not_found")
        return requested


async def _service(request: Request) -> Service:
    """A coroutine, so FastAPI resolves it on the loop rather than in its thread pool."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(playground_html())


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """200 only while the worker takes requests: 503 when draining or dead, so a load
    balancer stops sending them."""
    worker = service.worker
    status = worker.status
    body = {"status": status, "model": service.names[0], **worker.snapshot()}
    if worker.fatal:
        body["error"] = worker.fatal
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(service: ServiceDep) -> dict:
    return {"object": "list", "data": [_model_card(service, name) for name in service.names]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, service: ServiceDep) -> dict:
    return _model_card(service, service.model_name(model_id))


@router.get("/v1/padlm/presets")
async def presets(service: ServiceDep) -> dict:
    persrm = service.served.persrm
    return {"presets": [{"id": key, "text": text} for key, text in PRESETS.items()],
            "strategies": list(service.served.strategies),
            "default_strategy": service.planner.default_strategy,
            "recommended_weight": persrm.recommended_weight if persrm else None,
            "top_k": persrm.top_k if persrm else None, "persrm": service.persrm_label,
            "model": service.names[0], "engine": service.served.engine}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, service: ServiceDep) -> Response:
    def conversation(body: ChatCompletionRequest) -> list:
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        return [[{"role": m.role, "content": m.text()} for m in body.messages]]

    return await _complete(request, service, ChatCompletionRequest, conversation, "messages",
                           "chat", "chatcmpl")


@router.post("/v1/completions")
async def completions(request: Request, service: ServiceDep) -> Response:
    def prompts(body: CompletionRequest) -> list:
        found = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not found:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return found

    return await _complete(request, service, CompletionRequest, prompts, "prompt", "text",
                           "cmpl")


async def _complete(request: Request, service: Service, kind_of_body: type,
                    prompts_of: Callable, param: str, kind: str, prefix: str) -> Response:
    """What both completion routes do around their own prompts: read and parse the body
    strictly, check the model name, plan off the loop, then queue and answer."""
    raw = await read_body(request, service.settings, service.closing)
    body = parse_body(kind_of_body, raw)
    _log_extras(kind_of_body, raw)
    name = service.model_name(body.model)
    plan = await service.planner.plan_off_loop(body, prompts_of(body), param,
                                               tenant_of_request(request))
    return await _respond(request, service, body, plan, kind, f"{prefix}-{uuid.uuid4().hex}",
                          name)


async def _respond(request: Request, service: Service, body, plan: Plan, kind: str, rid: str,
                   model: str, answer=collect):
    """Queue the plan's rows as one job, then stream what comes back, or ``answer`` it
    (the response body; :func:`~padlm.server.replies.gather`: the texts)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def sink(items: list) -> None:  # called on the decode thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            loop.call_soon_threadsafe(queue.put_nowait, items)

    worker = service.worker
    job = Job(plan.rows, plan.expansion, sink, token_rewards=body.token_rewards,
              stream=body.stream, timeout_s=service.settings.request_timeout_s,
              prefill_tokens=plan.prefill_tokens)
    worker.submit(job)
    service.metrics.labelled(service.metrics.prompt_tokens).inc(plan.prompt_tokens)
    reply = Reply(kind, rid, int(time.time()), model, plan, queue, body.token_rewards,
                  service.persrm_label, functools.partial(worker.cancel, job),
                  _remembering(request, service, plan, rid))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_sse(reply, usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await answer(request, reply)


def _remembering(request: Request, service: Service, plan: Plan, rid: str):
    """What a reply calls with its choices' texts once they are final, before it answers: a
    profile's response is remembered (its features, for feedback) before the client can
    send feedback on it, on a thread (the store and the reward models block)."""
    if plan.user is None or service.profiles is None:
        return None
    tenant, prompts = tenant_of_request(request), plan.prompts

    async def remember(texts: list[str]) -> None:
        answered = [prompts[c // plan.n] for c in range(len(texts))]
        await asyncio.get_running_loop().run_in_executor(
            None, service.profiles.remember, tenant, plan.user, rid, answered, texts)

    return remember


def tenant_of_request(request: Request) -> str:
    """The API key's namespace the gate found, or the one namespace of a keyless server."""
    return getattr(request.state, "tenant", PUBLIC_TENANT)


def _profiles(service: Service) -> ProfileService:
    if service.profiles is None:
        raise ApiError(404, "this server keeps no profiles (padlm serve --profiles URL)",
                       code="profiles_disabled")
    return service.profiles


async def _profile_call(method, *args):
    """A profile operation on a thread (the store blocks), its refusals as API errors."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, method, *args)
    except ProfileError as error:
        raise ApiError(error.status, str(error), error.param, error.code) from None


@router.post("/v1/feedback")
async def feedback(request: Request, service: ServiceDep) -> dict:
    """Learn from a user's choice between two answers, or a thumb on one; answers with the
    profile as it now is."""
    profiles = _profiles(service)
    body = parse_body(FeedbackRequest, await read_body(request, service.settings,
                                                       service.closing))
    tenant = tenant_of_request(request)
    if body.response is not None:
        return await _profile_call(profiles.rate, tenant, body.user,
                                   ResponseRef(body.response.id, body.response.index),
                                   body.rating == "up")
    return await _profile_call(profiles.choose, tenant, body.user,
                               ResponseRef(body.chosen.id, body.chosen.index),
                               ResponseRef(body.rejected.id, body.rejected.index))


@router.get("/v1/profiles/{user:path}")
async def profile(user: str, request: Request, service: ServiceDep) -> dict:
    return await _profile_call(_profiles(service).show, tenant_of_request(request), user)


@router.post("/v1/profiles/{user:path}/history", response_model=None)
async def history(user: str, request: Request, service: ServiceDep) -> Response | dict:
    """Guided Profile Generation: the served model reads the user's past messages and
    writes how to answer them (the base model, greedy, as one request of the batch); the
    text becomes the profile's."""
    from padlm.profiles.history import PROFILE_TOKENS, history_prompt

    profiles = _profiles(service)
    body = parse_body(HistoryRequest, await read_body(request, service.settings,
                                                      service.closing))
    prompt = history_prompt(body.texts())
    messages = [{"role": "user", "content": prompt}]
    asked = ChatCompletionRequest(messages=[ChatMessage(role="user", content=prompt)],
                                  max_tokens=PROFILE_TOKENS, strategy="base")
    plan = await service.planner.plan_off_loop(asked, [messages], "messages",
                                               tenant_of_request(request))
    written = await _respond(request, service, asked, plan, "chat",
                             f"profile-{uuid.uuid4().hex}", service.names[0], gather)
    if isinstance(written, Response):
        return written
    text = " ".join(written.texts[0].split())
    if not text:
        raise ApiError(422, "the model wrote an empty profile from these messages",
                       "messages")
    return await _profile_call(profiles.set_text, tenant_of_request(request), user, text)


@router.delete("/v1/profiles/{user:path}")
async def forget(user: str, request: Request, service: ServiceDep) -> dict:
    """A user's right to be forgotten: profile, choices and remembered responses."""
    deleted = await _profile_call(_profiles(service).delete, tenant_of_request(request), user)
    return {"user": user, "deleted": deleted}


def _model_card(service: Service, name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "padlm",
            "max_model_len": service.served.context_length,
            "padlm": {"persrm": service.persrm_label, "guide": service.served.guide}}


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown route, a wrong method) in OpenAI's error shape."""
    return error_response(ApiError(error.status_code, str(error.detail),
                                   code="not_found" if error.status_code == 404 else None))


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug: logged here, while the client gets a 500 that shows nothing of it."""
    log.exception("unhandled error")
    return error_response(ApiError(500, "internal server error", kind="server_error"))


EXCEPTION_HANDLERS = {ApiError: api_error, StarletteHTTPException: http_error,
                      Exception: internal_error}


def _log_extras(model, raw: bytes) -> None:
    """One log line for the fields padlm ignores. The names are the client's: at most
    ``MAX_LOGGED_FIELDS`` of them, each escaped (``ascii``: a newline cannot forge another
    log line) and truncated, then a count (70,000 keys make one line, not 70,000)."""
    extras = extra_fields(model, json.loads(raw))
    if extras:
        log.warning("ignoring %d unknown request field(s): %s%s", len(extras), ", ".join(
            ascii(name[:MAX_LOGGED_FIELD_CHARS]) for name in extras[:MAX_LOGGED_FIELDS]),
            ", ..." if len(extras) > MAX_LOGGED_FIELDS else "")


def playground_html() -> str:
    return (resources.files("padlm.server") / "static" / "index.html").read_text("utf-8")


async def read_body(request: Request, settings: ServerSettings, closing: asyncio.Event
                    ) -> bytes:
    """The request body, refused with a 413 past ``max_body_bytes`` (declared or sent), and
    with a 408 when it takes longer than ``body_timeout_s`` or pauses longer than
    ``body_chunk_timeout_s`` (uvicorn has no body timeout: a client trickling a byte every
    few seconds would hold its connection and task for ever). When the server starts
    shutting down meanwhile (``closing``) the upload ends with a JSON 503 at once, instead of
    holding the exit and being cancelled into uvicorn's text/plain 500."""
    limit = settings.max_body_bytes
    too_large = ApiError(413, f"the request body exceeds the server's limit of {limit} bytes",
                         code="request_too_large", headers=_CLOSE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.body_timeout_s
    shutdown = asyncio.ensure_future(closing.wait())
    chunks, size = [], 0
    try:
        while True:
            wait = min(settings.body_chunk_timeout_s, deadline - loop.time())
            receive = asyncio.ensure_future(request.receive())
            await asyncio.wait({receive, shutdown}, timeout=max(wait, 0),
                               return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                if shutdown.done():
                    raise ApiError(503, SHUTTING_DOWN, kind="server_error",
                                   code="server_shutting_down", headers=_CLOSE)
                raise ApiError(408, "the request body did not arrive in time (the server "
                               f"waits {settings.body_chunk_timeout_s:g} s for each part and "
                               f"{settings.body_timeout_s:g} s in all)",
                               code="request_timeout", headers=_CLOSE)
            message = receive.result()
            if message["type"] == "http.disconnect":
                raise ApiError(CLIENT_CLOSED, "the client closed the connection",
                               code="client_closed")
            size += len(message.get("body", b""))
            if size > limit:
                raise too_large
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
    finally:
        shutdown.cancel()
