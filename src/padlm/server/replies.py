"""A reply in OpenAI's shapes, built from what the decode thread sends back.

The same events become either server-sent chunks (:func:`stream_sse`) or one JSON body
(:func:`collect`), for chat and text completions alike, so the two paths cannot drift apart.
Every byte goes through :func:`dumps`: nothing that is not valid JSON reaches a client. A
stream that fails ends with an error event, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from padlm.server.gate import error_response
from padlm.server.planning import Plan
from padlm.server.schemas import ApiError
from padlm.server.worker import JobDone, JobFailed, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """What a response is built from, shared by the streaming and the collecting path."""

    kind: str  # "chat" or "text"
    rid: str
    created: int
    model: str
    plan: Plan
    queue: asyncio.Queue  # the lists of events the decode thread sends, in order
    token_rewards: bool
    persrm: str  # the served PersRM's label, for the body's padlm block
    # frees the job's rows (the worker's cancel): called when the reply ends, however it
    # ends, so a client that left frees its rows at the next step
    release: Callable[[], None]
    # called with every choice's final text before the reply ends (a profile remembers
    # them for feedback); None: nothing to do
    finished: Callable[[list[str]], Awaitable[None]] | None = None

    def meta(self) -> dict:
        """The reply's ``padlm`` object (a stream sends it in its last chunk)."""
        meta = {"strategy": self.plan.strategy,
                "preference": self.plan.preference.text or None, "persrm": self.persrm}
        if self.plan.profile is not None:
            meta["profile"] = self.plan.profile
        return meta

    async def finish(self, texts: list[str]) -> None:
        """Hand the texts on; a failure to remember them is logged, and the response (which
        the client is owed) still goes out, saying so."""
        if self.finished is None:
            return
        try:
            await self.finished(texts)
        except Exception:
            log.exception("could not remember the choices of %s for feedback", self.rid)
            if self.plan.profile is not None:
                self.plan.profile["remembered"] = False

    def chunk(self, choice: dict, **extra) -> str:
        return _chunk(self.kind, self.rid, self.created, self.model, choice, **extra)


@dataclass
class Gathered:
    """Every choice of a reply once it has finished."""

    texts: list[str]
    finishes: list[str]
    tokens: list[int]
    traces: list[list | None]


async def gather(request: Request, reply: Reply) -> Gathered | Response:
    """Wait for every choice; a 499 if the client left, the error if the job failed."""
    count = reply.plan.choices
    done = Gathered([""] * count, ["length"] * count, [0] * count, [None] * count)
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
                    done.texts[item.index] = item.text or ""
                    done.finishes[item.index] = item.finish_reason
                    done.tokens[item.index] = item.completion_tokens
                    done.traces[item.index] = item.trace
            if any(isinstance(item, JobDone) for item in items):
                return done
    finally:
        gone.cancel()
        reply.release()


async def collect(request: Request, reply: Reply) -> Response:
    """The non-streamed body, once every choice has finished; a 499 if the client left."""
    gathered = await gather(request, reply)
    if isinstance(gathered, Response):
        return gathered
    count, texts, finishes = reply.plan.choices, gathered.texts, gathered.finishes
    tokens, traces = gathered.tokens, gathered.traces
    await reply.finish(texts)
    if reply.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None, "finish_reason": finishes[i]} for i in range(count)]
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None,
                    "finish_reason": finishes[i]} for i in range(count)]
    meta = reply.meta()
    if any(traces):  # mix: each choice's expert weights, token by token
        meta["mix_weights"] = traces
    return JSONResponse({
        "id": reply.rid, "object": "chat.completion" if reply.kind == "chat"
        else "text_completion", "created": reply.created, "model": reply.model,
        "choices": choices, "usage": _usage(reply.plan.prompt_tokens, sum(tokens)),
        "padlm": meta})


async def stream_sse(reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The SSE events. A chunk that cannot be written as JSON (a value that is not
    finite) ends the stream with a 500 error event, logged, as the same failure does in
    a non-streamed response; nothing invalid is ever sent."""
    completion, texts = 0, [""] * reply.plan.choices
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
                if item.token is not None and reply.token_rewards:
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
                    texts[item.index] = item.text or ""
                    yield reply.chunk(_choice(reply.kind, item.index, None,
                                              item.finish_reason))
        await reply.finish(texts)  # kept for feedback before the client can send it
        if reply.plan.profile is not None:  # the profile behind it
            yield reply.chunk({}, padlm=reply.meta())
        if include_usage:
            yield reply.chunk({}, usage=_usage(reply.plan.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    except ValueError:  # from dumps: allow_nan=False
        log.exception("a chunk of %s is not valid JSON; the stream ends with a 500",
                      reply.rid)
        yield _event(ApiError(500, "internal server error", kind="server_error"))
        yield "data: [DONE]\n\n"
    finally:
        reply.release()


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


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
