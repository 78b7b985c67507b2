"""The OpenAI-compatible HTTP layer: validation, SSE streaming, and the playground page.

Handlers never touch the models: they validate a request against the loaded model and the
server's limits (with their own tokenizer copy, so the event loop and the decode thread never
share a tokenizer), turn it into the rows of one :class:`~padlm.server.worker.Job`, queue it,
and relay what the decode thread sends back. :mod:`padlm.server.gate` checks host, key and
content type first; :class:`PadlmServer` drains the worker on SIGTERM.

Choices made where OpenAI's API and padlm differ (documented in docs/serving.md):
- ``temperature`` defaults to 0 (greedy, PAD's released setting), not OpenAI's 1.0.
- ``/v1/completions`` renders each prompt as one user turn of the chat template, like chat.
- ``model`` may be left out (the served model answers); a name it is not served under is a 404.
- a stream that fails or is cut by shutdown ends with an error event, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from padlm.config import SEED_LIMIT, GenerationConfig
from padlm.decoding import Rendered
from padlm.decoding import Request as DecodeRequest
from padlm.engine import Personalizer
from padlm.errors import PadlmError
from padlm.preferences import PRESETS, resolve_preference
from padlm.registry import strategy_class
from padlm.server.gate import CLIENT_CLOSED, Gate, TimedH11Protocol, error_response
from padlm.server.metrics import CONTENT_TYPE, ServerMetrics
from padlm.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    extra_fields,
    parse_body,
)
from padlm.server.settings import ServerSettings
from padlm.server.worker import BatchWorker, Job, JobDone, JobFailed, TokenEvent

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128  # when a request names none (capped by the room left in the context)
DEFAULT_BEST_OF = 4
MAX_STOP = 4  # as in OpenAI's API
SHUTDOWN_FLUSH_S = 5  # after the drain, connections get this long to send their last bytes
# the decode step's precision (top_p, mix weights): its smallest normal and largest values,
# as Python floats (compared in float64, nothing is cast)
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
MAX_LOGGED_FIELDS = 10  # unknown request fields named in the log, at most
MAX_LOGGED_FIELD_CHARS = 40

# GenerationConfig's field names where the request's field is named differently
_PARAM_OF = {"max_new_tokens": "max_tokens", "top_k": "pad.top_k", "weight": "pad.weight",
             "echo_guard": "pad.echo_guard", "mix": "mix.weights", "reference": "pad.reference"}


@dataclass
class Plan:
    """A validated request: the rows to decode, and what the response needs."""

    rows: list[DecodeRequest]
    choices: int
    prompt_tokens: int  # the usage's: each prompt's longest context, once
    # what the decode thread prefills: every lane of every stream of every row (admission
    # and --max-prompt-tokens weigh this, the real work, not the usage count)
    prefill_tokens: int
    strategy: str
    batch: str  # the token-level strategy the rows decode with
    preference: str
    best_of: int = 1
    picker: object | None = None  # best-of-n: keeps one of each choice's best_of samples


class Service:
    """State shared by the handlers: the engine, the worker, limits and a private tokenizer."""

    def __init__(self, engine: Personalizer, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.served = engine.served_model()
        # a model loaded from a directory is named by its path: answer to the last part only
        # (no response may show the server's file system)
        own = self.served.name
        self.names = settings.served_model_names or (
            Path(own).name if Path(own).is_absolute() else own,)
        self.metrics = ServerMetrics(self.names[0])
        self.worker = BatchWorker(engine, settings, observer=self.metrics)
        # planning (render, tokenize, embed a mix preference) is CPU work proportional to the
        # request: it runs here, off the event loop so that no request stalls the others'
        # streams, and on one thread so that this tokenizer copy is never used by two threads
        # (the decode thread has its own)
        self.planner = ThreadPoolExecutor(1, thread_name_prefix="padlm-plan")
        self.tokenizer = self.served.tokenizer  # the planner thread's own copy
        # set when uvicorn starts shutting down: unfinished uploads then end with a 503
        self.closing = asyncio.Event()
        self.context_length = self.served.context_length
        self.vocab_size = self.served.vocab_size
        self.persrm_label = (Path(self.served.persrm_path).name if self.served.persrm_path
                             else self.served.guide or ("identity" if self.served.persrm
                                                        else "none"))
        self.metrics.watch(self.worker.snapshot)

    def model_name(self, requested: str | None) -> str:
        """The name to answer under: the requested one if the model is served under it."""
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise ApiError(404, f"the model {requested!r} does not exist; this server serves "
                           f"{', '.join(self.names)}", "model", "model_not_found")
        return requested

    async def plan_off_loop(self, body, prompts: Sequence, prompt_param: str) -> Plan:
        """:meth:`plan` on the planner thread, after the size caps (checked here, on the
        loop: they are cheap, and a flood of huge requests is refused before it queues up
        for the planner)."""
        self.check_sizes(body, prompts, prompt_param)
        return await asyncio.get_running_loop().run_in_executor(
            self.planner, self.plan, body, prompts, prompt_param)

    def check_sizes(self, body, prompts: Sequence, prompt_param: str) -> None:
        """Character caps, before any tokenization: what the planner and the decode loop do
        grows with these texts (rendering, tokenizing, matching stop strings every step)."""
        chars = sum(len(prompt) if isinstance(prompt, str)
                    else sum(len(m["role"]) + len(m["content"]) for m in prompt)
                    for prompt in prompts)
        limits = self.settings
        if chars > limits.max_prompt_chars:
            raise ApiError(400, f"{prompt_param} hold {chars} characters; the server takes at "
                           f"most {limits.max_prompt_chars} (--max-prompt-chars)",
                           prompt_param, "prompt_too_long")
        if body.preference and len(body.preference) > limits.max_preference_chars:
            raise ApiError(400, f"preference has {len(body.preference)} characters; the "
                           f"server takes at most {limits.max_preference_chars}",
                           "preference", "preference_too_long")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise ApiError(400, f"each stop string may have at most {limits.max_stop_chars} "
                           "characters", "stop")

    def plan(self, body, prompts: Sequence, prompt_param: str) -> Plan:
        """Check everything a client can get wrong before any decoding starts, against the
        loaded model and the server's limits, so no request can fail in the decode loop."""
        try:
            preference = resolve_preference(body.preference)
        except PadlmError as error:
            raise ApiError(400, str(error), "preference", "unknown_preference") from None
        strategy = self.strategy_of(body, preference)
        try:
            spec = strategy_class(strategy).spec
        except PadlmError as error:
            raise ApiError(400, str(error), "strategy", "unknown_strategy") from None
        limit = self.settings.n_limit
        if not 1 <= body.n <= limit:
            raise ApiError(400, f"n must be between 1 and the server's limit {limit}", "n")
        best_of = 1
        if spec.level == "sequence":
            if body.stream:
                raise ApiError(400, f"strategy {spec.name} picks a response after sampling "
                               "them all, so it cannot stream; send stream=false", "stream")
            best_of = body.best_of if body.best_of is not None else min(DEFAULT_BEST_OF, limit)
            if not 1 <= best_of <= limit:
                raise ApiError(400, f"best_of must be between 1 and {limit}", "best_of")
        elif body.best_of not in (None, 1):
            raise ApiError(400, "best_of needs strategy 'best-of-n'", "best_of")
        rows = len(prompts) * body.n * best_of
        if rows > self.settings.max_batch_size:
            raise ApiError(400, f"prompts x n x best_of = {rows} rows; the server decodes at "
                           f"most {self.settings.max_batch_size} rows at once",
                           "best_of" if best_of > 1 else "n")
        max_tokens = body.max_tokens
        if max_tokens is None and isinstance(body, ChatCompletionRequest):
            max_tokens = body.max_completion_tokens
        cap = self.settings.max_tokens_cap
        if max_tokens is not None and not 1 <= max_tokens <= cap:
            raise ApiError(400, f"max_tokens must be between 1 and the server's cap {cap}, "
                           f"got {max_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty strings", "stop")
        config = self._config(body, strategy, stop)
        self._check_bounds(config, body.n * best_of)
        if body.token_rewards and not self.served.token_rewards:
            raise ApiError(400, f"token_rewards cannot be reported by the {self.served.engine} "
                           "engine (the PersRM runs inside it); use padlm serve --engine hf",
                           "token_rewards")
        picker = self.engine.strategy(strategy) if spec.level == "sequence" else None
        batch = picker.sampler if picker else strategy
        requests, prompt_tokens, prefill_tokens = [], 0, 0
        for prompt in prompts:
            rendered = self._render(DecodeRequest(prompt, preference, config), batch,
                                    prompt_param)
            lengths = [len(lane) for lanes in rendered.contexts for lane in lanes]
            length, lanes = max(lengths), sum(lengths)
            room = self.context_length - length
            wanted = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, room,
                                                                   cap)
            if length + max(wanted, 1) > self.context_length:
                raise ApiError(400, f"this model's maximum context length is "
                               f"{self.context_length} tokens; the prompt has {length} and "
                               f"{wanted} more were requested", prompt_param,
                               "context_length_exceeded")
            # after the model's own limit, which a client can act on alone
            prefill_tokens += lanes * body.n * best_of
            if prefill_tokens > self.settings.max_prompt_tokens:
                raise ApiError(400, f"this request would prefill {prefill_tokens} or more "
                               f"prompt tokens (each prompt's {lanes} over its lanes, times "
                               f"{body.n * best_of} rows); the server's limit is "
                               f"{self.settings.max_prompt_tokens} (--max-prompt-tokens)",
                               prompt_param, "prompt_too_long")
            prompt_tokens += length
            for i in range(body.n):
                seed = None if config.seed is None else config.seed + i * best_of
                request = DecodeRequest(prompt, preference,
                                        replace(config, max_new_tokens=wanted, seed=seed),
                                        rendered)  # the decode thread renders nothing again
                try:  # best-of-n's scorer refuses what it cannot score (free text)
                    requests.extend(picker.sample_requests(request, best_of) if picker
                                    else [request])
                except PadlmError as error:
                    raise ApiError(400, str(error), error.param or prompt_param) from None
        return Plan(requests, len(prompts) * body.n, prompt_tokens, prefill_tokens, strategy,
                    batch, preference, best_of, picker)

    def _check_bounds(self, config: GenerationConfig, samples: int) -> None:
        """What a valid config may still break in this model or this server: a top-k beyond
        the vocabulary (``topk`` fails for the whole batch) or the server's cap (every pad
        row of a batch is widened to the largest k), a top-p that is 0 in the decode step's
        float32 (``1e-46``: no token is kept, the step fails) and derived seeds past 64 bits.
        Settings whose scores would overflow are refused by GenerationConfig itself."""
        top_k_cap = min(self.vocab_size, self.settings.max_top_k)
        if config.top_k is not None and config.top_k > top_k_cap:
            raise ApiError(400, f"pad.top_k must be at most {top_k_cap} (the server's "
                           f"--max-top-k, or the vocabulary size), got {config.top_k}",
                           "pad.top_k")
        if config.top_p < FLOAT32_TINY:
            raise ApiError(400, f"top_p must be at least {FLOAT32_TINY:.3g} (it is applied in "
                           f"float32), got {config.top_p!r}", "top_p")
        if config.seed is not None and config.seed + samples > SEED_LIMIT:
            raise ApiError(400, f"seed must be below 2**63 - {samples}: each of this "
                           f"request's {samples} samples uses seed + i, a signed 64-bit "
                           "value", "seed")

    @property
    def default_strategy(self) -> str:
        """What a request with a preference and no strategy gets."""
        return "pad" if "pad" in self.served.strategies else "prompt"

    def strategy_of(self, body, preference: str) -> str:
        """The request's strategy; one that names none gets the server's default, or
        ``base`` without a preference: a plain OpenAI client (an LLM judge, say) gets the
        base model on every engine, not PAD toward an empty preference."""
        if "strategy" in body.model_fields_set:
            return body.strategy
        return self.default_strategy if preference else "base"

    def _config(self, body, strategy: str, stop: list[str]) -> GenerationConfig:
        pad = body.pad
        if body.mix and not isinstance(body.mix.weights, str):
            _check_float32_weights(body.mix.weights)
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
                mix=body.mix.setting() if body.mix else None,
                reference=pad.reference if pad else None,
            )
            self.engine.check(strategy, config)
        except PadlmError as error:
            raise ApiError(400, str(error), _PARAM_OF.get(error.param, error.param)) from None
        return config

    def _render(self, request: DecodeRequest, strategy: str, param: str) -> Rendered:
        """Every context the strategy builds for one row of this request (its lanes' own
        preference texts and placements), rendered once here and carried to the decode
        thread; also where a request the strategy cannot serve (an unknown expert, a bad
        mix) is refused before it is queued."""
        try:
            return Rendered(strategy, self.engine.contexts(strategy, request))
        except PadlmError as error:
            raise ApiError(400, str(error), _PARAM_OF.get(error.param, error.param or param)
                           ) from None


def _check_float32_weights(weights: Sequence[float]) -> None:
    """Fixed mix/soups weights are normalised in float64 (:func:`padlm.config.mix_weights`),
    but the decode step, and the ``mix_weights`` a response reports, are float32: a weight
    float32 cannot hold (``1e300`` overflows to infinity, ``1e-50`` rounds to 0) would be
    decoded as some other weight than the one sent, so it is refused, naming the field."""
    for weight in weights:
        if weight != 0 and not FLOAT32_TINY <= abs(weight) <= FLOAT32_MAX:
            raise ApiError(400, f"mix.weights must each be 0 or between {FLOAT32_TINY:.3g} "
                           f"and {FLOAT32_MAX:.3g} (float32), got {weight!r}", "mix.weights")


def dumps(content: object) -> str:
    """JSON as every response writes it: ``NaN`` and ``Infinity`` are not JSON (a browser's
    ``JSON.parse`` throws on them), so a value that is not finite raises ``ValueError`` here
    instead of reaching a client; Starlette's ``JSONResponse`` does the same."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False)


def _chunk(kind: str, rid: str, created: int, model: str, choice: dict, **extra) -> str:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [choice] if choice else [], **extra}
    return f"data: {dumps(body)}\n\n"


def _event(error: ApiError) -> str:
    """A stream's error event (followed by ``[DONE]``)."""
    return f"data: {dumps(error.body())}\n\n"


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


def playground_html() -> str:
    return (resources.files("padlm.server") / "static" / "index.html").read_text("utf-8")


SHUTTING_DOWN = "the server is shutting down"
# the connection closes after these: the rest of the body is never read
_CLOSE = {"Connection": "close"}


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


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Personalizer, settings: ServerSettings | None = None,
               **fields) -> FastAPI:
    """The FastAPI app; its decode worker starts and stops with the app's lifespan.
    ``fields`` override single settings: ``create_app(engine, max_batch_size=4)``."""
    settings = replace(settings or ServerSettings(), **fields)
    service = Service(engine, settings)
    worker = service.worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            service.planner.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="padlm", version="0.1.0", lifespan=lifespan, docs_url="/docs")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail),
                                       code="not_found" if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ApiError(500, "internal server error", kind="server_error"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html())

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 only while the worker takes requests: 503 when draining or dead, so a load
        balancer stops sending them."""
        status = worker.status
        body = {"status": status, "model": service.names[0], **worker.snapshot()}
        if worker.fatal:
            body["error"] = worker.fatal
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "padlm",
                "max_model_len": service.context_length,
                "padlm": {"persrm": service.persrm_label, "guide": service.served.guide}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in service.names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return model_card(service.model_name(model_id))

    @app.get("/v1/padlm/presets")
    async def presets() -> dict:
        persrm = service.served.persrm
        return {"presets": [{"id": key, "text": text} for key, text in PRESETS.items()],
                "strategies": list(service.served.strategies),
                "default_strategy": service.default_strategy,
                "recommended_weight": persrm.recommended_weight if persrm else None,
                "top_k": persrm.top_k if persrm else None, "persrm": service.persrm_label,
                "model": service.names[0], "engine": service.served.engine}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, settings, service.closing)
        body = parse_body(ChatCompletionRequest, raw)
        _log_extras(ChatCompletionRequest, raw)
        name = service.model_name(body.model)
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        plan = await service.plan_off_loop(body, [messages], "messages")
        return await _respond(request, body, plan, "chat", f"chatcmpl-{uuid.uuid4().hex}", name)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        raw = await read_body(request, settings, service.closing)
        body = parse_body(CompletionRequest, raw)
        _log_extras(CompletionRequest, raw)
        name = service.model_name(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt must not be empty", "prompt")
        plan = await service.plan_off_loop(body, prompts, "prompt")
        return await _respond(request, body, plan, "text", f"cmpl-{uuid.uuid4().hex}", name)

    async def _respond(request: Request, body, plan: Plan, kind: str, rid: str,
                       model: str) -> Response:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def sink(items: list) -> None:  # called on the decode thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
                loop.call_soon_threadsafe(queue.put_nowait, items)

        job = Job(plan.rows, plan.batch, sink, picker=plan.picker, best_of=plan.best_of,
                  token_rewards=body.token_rewards, stream=body.stream,
                  timeout_s=settings.request_timeout_s, prefill_tokens=plan.prefill_tokens)
        worker.submit(job)
        service.metrics.labelled(service.metrics.prompt_tokens).inc(plan.prompt_tokens)
        reply = Reply(kind, rid, int(time.time()), model, plan, queue)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, reply, usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, job, reply)

    async def _collect(request: Request, job: Job, reply: Reply) -> Response:
        count = reply.plan.choices
        texts, finishes, tokens = [""] * count, ["length"] * count, [0] * count
        traces: list[list | None] = [None] * count
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                getter = asyncio.ensure_future(reply.queue.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return Response(status_code=499)  # the finally frees the rows
                items = getter.result()
                for item in items:
                    if isinstance(item, JobFailed):
                        return error_response(item.error)
                    if isinstance(item, TokenEvent) and item.finish_reason is not None:
                        texts[item.index] = item.text or ""
                        finishes[item.index] = item.finish_reason
                        tokens[item.index] = item.completion_tokens
                        traces[item.index] = item.trace
                if any(isinstance(item, JobDone) for item in items):
                    break
        finally:
            gone.cancel()
            worker.cancel(job)
        if reply.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": None, "finish_reason": finishes[i]} for i in range(count)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None,
                        "finish_reason": finishes[i]} for i in range(count)]
        meta = {"strategy": reply.plan.strategy, "preference": reply.plan.preference or None,
                "persrm": service.persrm_label}
        if any(traces):  # mix: each choice's expert weights, token by token
            meta["mix_weights"] = traces
        return JSONResponse({
            "id": reply.rid, "object": "chat.completion" if reply.kind == "chat"
            else "text_completion", "created": reply.created, "model": reply.model,
            "choices": choices, "usage": _usage(reply.plan.prompt_tokens, sum(tokens)),
            "padlm": meta})

    async def _stream(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """The SSE events. A chunk that cannot be written as JSON (a value that is not
        finite) ends the stream with a 500 error event, logged, as the same failure does in
        a non-streamed response; nothing invalid is ever sent."""
        completion = 0
        try:
            if reply.kind == "chat":
                for i in range(reply.plan.choices):
                    yield reply.chunk(_choice(reply.kind, i, None, None, True))
            done = False
            while not done:
                for item in await reply.queue.get():
                    if isinstance(item, JobFailed):  # an error event, then the usual end
                        yield _event(item.error)
                        yield "data: [DONE]\n\n"
                        return
                    if isinstance(item, JobDone):
                        done = True
                        continue
                    extra, padlm = {}, {}
                    if item.token is not None and job.token_rewards:
                        padlm = {"index": item.index, "token": item.token,
                                 "text": item.piece, "reward": item.reward}
                    if item.mix_weights is not None:
                        padlm.update(index=item.index, mix_weights=item.mix_weights)
                    if padlm:
                        extra["padlm"] = padlm
                    if item.delta or extra:
                        yield reply.chunk(_choice(reply.kind, item.index, item.delta, None),
                                          **extra)
                    if item.finish_reason is not None:
                        completion += item.completion_tokens
                        yield reply.chunk(_choice(reply.kind, item.index, None,
                                                  item.finish_reason))
            if include_usage:
                yield reply.chunk({}, usage=_usage(reply.plan.prompt_tokens, completion))
            yield "data: [DONE]\n\n"
        except ValueError:  # from dumps: allow_nan=False
            log.exception("a chunk of %s is not valid JSON; the stream ends with a 500",
                          reply.rid)
            yield _event(ApiError(500, "internal server error", kind="server_error"))
            yield "data: [DONE]\n\n"
        finally:
            worker.cancel(job)  # a client that left frees its rows at the next step

    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(Gate, settings=settings, metrics=service.metrics, routes=routes)
    if settings.cors_origins:  # outermost: preflights are answered before the gate
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    return app


@dataclass
class Reply:
    """What a response is built from, shared by the streaming and the collecting path."""

    kind: str  # "chat" or "text"
    rid: str
    created: int
    model: str
    plan: Plan
    queue: asyncio.Queue

    def chunk(self, choice: dict, **extra) -> str:
        return _chunk(self.kind, self.rid, self.created, self.model, choice, **extra)


def _log_extras(model, raw: bytes) -> None:
    """One log line for the fields padlm ignores. The names are the client's: at most
    ``MAX_LOGGED_FIELDS`` of them, each escaped (``ascii``: a newline cannot forge another
    log line) and truncated, then a count (70,000 keys make one line, not 70,000)."""
    extras = extra_fields(model, json.loads(raw))
    if extras:
        log.warning("ignoring %d unknown request field(s): %s%s", len(extras), ", ".join(
            ascii(name[:MAX_LOGGED_FIELD_CHARS]) for name in extras[:MAX_LOGGED_FIELDS]),
            ", ..." if len(extras) > MAX_LOGGED_FIELDS else "")


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
        self.service.closing.set()  # unfinished uploads answer 503 now (see read_body)
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
    lacks (the body timeout is :func:`read_body`'s)."""
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
