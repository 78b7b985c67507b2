"""The OpenAI-compatible HTTP layer: validation, SSE streaming, and the playground page.

Handlers never touch the models: they validate a request (with their own tokenizer copy, so
the event loop and the decode thread never share a tokenizer), turn it into one
:class:`~padlm.decoding.Request` per choice, queue a :class:`~padlm.server.worker.Job` and
relay what the decode thread sends back.

Choices made where OpenAI's API and padlm differ (documented in the README):
- ``temperature`` defaults to 0 (greedy, PAD's released setting), not OpenAI's 1.0.
- ``/v1/completions`` renders each prompt as one user turn of the chat template, like chat.
- ``model`` may be any string; the one loaded model answers and is named in the response.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from padlm.config import GenerationConfig
from padlm.decoding import Request as DecodeRequest
from padlm.engine import Personalizer, available_strategies
from padlm.errors import PadlmError
from padlm.preferences import PRESETS, resolve_preference
from padlm.prompting import render
from padlm.registry import check_request, strategy_class
from padlm.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    extra_fields,
    parse_body,
)
from padlm.server.worker import BatchWorker, Job, JobDone, JobFailed, TokenEvent

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128  # when a request names none (capped by the room left in the context)
DEFAULT_BEST_OF = 4
MAX_STOP = 4  # as in OpenAI's API
DISCONNECT_POLL_S = 0.5
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish when the server stops

# GenerationConfig's field names where the request's field is named differently
_PARAM_OF = {"max_new_tokens": "max_tokens", "top_k": "pad.top_k", "weight": "pad.weight",
             "echo_guard": "pad.echo_guard"}


@dataclass
class Plan:
    """A validated request: one decode request per choice, and what the response needs."""

    requests: list[DecodeRequest]
    prompt_tokens: int
    strategy: str
    preference: str
    best_of: int


class Service:
    """State shared by the handlers: the engine, the worker and a private tokenizer."""

    def __init__(self, engine: Personalizer, max_batch_size: int, max_queue: int) -> None:
        self.engine = engine
        self.worker = BatchWorker(engine, max_batch_size, max_queue)
        self.tokenizer = copy.deepcopy(engine.lm.tokenizer)  # the event loop's own copy
        self.model_id = engine.lm.name
        self.context_length = int(getattr(engine.lm.model.config, "max_position_embeddings",
                                          0) or 2048)

    def plan(self, body, prompts: Sequence, prompt_param: str) -> Plan:
        """Check everything a client can get wrong before any decoding starts."""
        try:
            spec = strategy_class(body.strategy).spec
        except PadlmError as error:
            raise ApiError(400, str(error), "strategy", "unknown_strategy") from None
        try:
            preference = resolve_preference(body.preference)
        except PadlmError as error:
            raise ApiError(400, str(error), "preference", "unknown_preference") from None
        limit = self.worker.max_batch_size
        if not 1 <= body.n <= limit:
            raise ApiError(400, f"n must be between 1 and the server's max batch size {limit}",
                           "n")
        best_of = body.best_of if body.best_of is not None else DEFAULT_BEST_OF
        if spec.level == "sequence":
            if body.stream:
                raise ApiError(400, f"strategy {spec.name} picks a response after sampling them "
                               "all, so it cannot stream; send stream=false", "stream")
            if not 1 <= best_of <= limit:
                raise ApiError(400, f"best_of must be between 1 and {limit}", "best_of")
        elif body.best_of not in (None, 1):
            raise ApiError(400, "best_of needs strategy 'best-of-n'", "best_of")
        max_tokens = body.max_tokens
        if max_tokens is None and isinstance(body, ChatCompletionRequest):
            max_tokens = body.max_completion_tokens
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty strings", "stop")
        config = self._config(body, stop)
        requests, prompt_tokens = [], 0
        for prompt in prompts:
            length = self._prompt_length(prompt, preference, body.strategy, prompt_param)
            room = self.context_length - length
            wanted = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, room)
            if length + max(wanted, 1) > self.context_length:
                raise ApiError(400, f"this model's maximum context length is "
                               f"{self.context_length} tokens; the prompt has {length} and "
                               f"{wanted} more were requested", prompt_param,
                               "context_length_exceeded")
            prompt_tokens += length
            for i in range(body.n):
                seed = None if config.seed is None else config.seed + i
                requests.append(DecodeRequest(prompt, preference,
                                              replace(config, max_new_tokens=wanted, seed=seed)))
        return Plan(requests, prompt_tokens, body.strategy, preference, best_of)

    @staticmethod
    def _config(body, stop: list[str]) -> GenerationConfig:
        pad = body.pad
        try:
            config = GenerationConfig(
                temperature=0.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed, stop=tuple(stop),
                no_repeat_ngram_size=body.no_repeat_ngram_size or 0,
                repetition_penalty=(1.0 if body.repetition_penalty is None
                                    else body.repetition_penalty),
                weight=pad.weight if pad else None, top_k=pad.top_k if pad else None,
                echo_guard=bool(pad and pad.echo_guard), ignore_eos=body.ignore_eos,
            )
            check_request(body.strategy, config)
        except PadlmError as error:
            raise ApiError(400, str(error), _PARAM_OF.get(error.param, error.param)) from None
        return config

    def _prompt_length(self, prompt, preference: str, strategy: str, param: str) -> int:
        try:
            ids = render(self.tokenizer, prompt, "" if strategy == "base" else preference,
                         self.engine.placement)
        except PadlmError as error:
            raise ApiError(400, str(error), param) from None
        return len(ids)


def _chunk(kind: str, rid: str, created: int, model: str, choice: dict, **extra) -> str:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [choice] if choice else [], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _choice(kind: str, index: int, text: str | None, finish: str | None,
            role: bool = False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else (
            {} if text is None else {"content": text})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def playground_html() -> str:
    return (resources.files("padlm.server") / "static" / "index.html").read_text("utf-8")


def create_app(engine: Personalizer, max_batch_size: int = 16, max_queue: int = 64) -> FastAPI:
    """The FastAPI app; its decode worker starts and stops with the app's lifespan."""
    service = Service(engine, max_batch_size, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

    app = FastAPI(title="padlm", version="0.1.0", lifespan=lifespan, docs_url="/docs")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(ApiError(error.status_code, str(error.detail),
                                        code="not_found" if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(ApiError(500, "internal server error", kind="server_error"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if service.worker.snapshot()["alive"] else "worker-dead",
                "model": service.model_id, **service.worker.snapshot()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": 0, "owned_by": "padlm"}]}

    @app.get("/v1/padlm/presets")
    async def presets() -> dict:
        persrm = engine.persrm
        return {"presets": [{"id": key, "text": text} for key, text in PRESETS.items()],
                "strategies": list(available_strategies()), "default_strategy": "pad",
                "recommended_weight": persrm.config.recommended_weight,
                "top_k": persrm.config.top_k, "persrm": engine.persrm_name,
                "model": service.model_id}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        body = parse_body(ChatCompletionRequest, raw)
        _log_extras(ChatCompletionRequest, raw)
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        plan = service.plan(body, [messages], "messages")
        return await _respond(request, body, plan, "chat", f"chatcmpl-{uuid.uuid4().hex}")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        raw = await request.body()
        body = parse_body(CompletionRequest, raw)
        _log_extras(CompletionRequest, raw)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt must not be empty", "prompt")
        if len(prompts) * body.n > service.worker.max_batch_size:
            raise ApiError(400, f"prompts x n must be <= the server's max batch size "
                           f"{service.worker.max_batch_size}", "prompt")
        plan = service.plan(body, prompts, "prompt")
        return await _respond(request, body, plan, "text", f"cmpl-{uuid.uuid4().hex}")

    async def _respond(request: Request, body, plan: Plan, kind: str, rid: str) -> Response:
        job = Job(plan.requests, plan.strategy, asyncio.get_running_loop(), asyncio.Queue(),
                  token_rewards=body.token_rewards, stream=body.stream, best_of=plan.best_of)
        service.worker.submit(job)
        created = int(time.time())
        meta = {"strategy": plan.strategy, "preference": plan.preference or None,
                "persrm": engine.persrm_name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, kind, rid, created, plan, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, job, kind, rid, created, plan, meta)

    async def _collect(request: Request, job: Job, kind: str, rid: str, created: int,
                       plan: Plan, meta: dict) -> Response:
        count = len(plan.requests)
        texts, finishes, tokens = [""] * count, ["length"] * count, [0] * count
        try:
            while True:
                try:
                    items = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    items = []
                if not items and await request.is_disconnected():
                    return Response(status_code=499)  # the finally frees the rows
                for item in items:
                    if isinstance(item, JobFailed):
                        return _error_response(item.error)
                    if isinstance(item, TokenEvent) and item.finish_reason is not None:
                        texts[item.index] = item.text or ""
                        finishes[item.index] = item.finish_reason
                        tokens[item.index] = item.completion_tokens
                if any(isinstance(item, JobDone) for item in items):
                    break
        finally:
            job.cancel()
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": None, "finish_reason": finishes[i]} for i in range(count)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None,
                        "finish_reason": finishes[i]} for i in range(count)]
        return JSONResponse({
            "id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": service.model_id, "choices": choices,
            "usage": _usage(plan.prompt_tokens, sum(tokens)), "padlm": meta})

    async def _stream(job: Job, kind: str, rid: str, created: int, plan: Plan,
                      include_usage: bool) -> AsyncIterator[str]:
        model = service.model_id
        completion = 0
        try:
            if kind == "chat":
                for i in range(len(plan.requests)):
                    yield _chunk(kind, rid, created, model, _choice(kind, i, None, None, True))
            done = False
            while not done:
                for item in await job.queue.get():
                    if isinstance(item, JobFailed):
                        yield f"data: {json.dumps(item.error.body())}\n\n"
                        return
                    if isinstance(item, JobDone):
                        done = True
                        continue
                    extra = {}
                    if item.token is not None and job.token_rewards:
                        extra["padlm"] = {"index": item.index, "token": item.token,
                                          "text": item.piece, "reward": item.reward}
                    if item.delta or extra:
                        yield _chunk(kind, rid, created, model,
                                     _choice(kind, item.index, item.delta, None), **extra)
                    if item.finish_reason is not None:
                        completion += item.completion_tokens
                        yield _chunk(kind, rid, created, model,
                                     _choice(kind, item.index, None, item.finish_reason))
            if include_usage:
                yield _chunk(kind, rid, created, model, {},
                             usage=_usage(plan.prompt_tokens, completion))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that left frees its rows at the next step

    return app


def _log_extras(model, raw: bytes) -> None:
    extras = extra_fields(model, json.loads(raw))
    if extras:
        log.warning("ignoring unknown request fields: %s", ", ".join(extras))


class ServerThread:
    """Run the app with uvicorn in a background thread (tests, notebooks, ``bench serve``).

    >>> with ServerThread(create_app(engine)) as server:          # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=port, log_level=log_level, lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
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
