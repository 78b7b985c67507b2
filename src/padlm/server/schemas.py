"""Request bodies of the OpenAI-compatible API, and the OpenAI error shape.

Bodies are validated strictly from the raw JSON (``"5"`` is not an integer), so a client gets
a 422 naming the field instead of a silently coerced value. Fields the OpenAI API defines but
padlm cannot honour (tools, structured output, logprobs, ...) are rejected with a 400 naming
the field when set to anything but their neutral value, so a client never mistakes a plain
answer for one that honoured them; fields nobody defines are ignored (and logged), as other
OpenAI-compatible servers do, because SDKs send extra keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error the client caused (or a full queue), rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    def check(self) -> None:
        """What a body of the right shape may still get wrong: a 400, after parsing."""


class TextPart(_Strict):
    type: str
    text: str = ""


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """OpenAI allows content as a list of parts; only text parts make sense here."""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise ApiError(400, f"message content parts of type {part.type!r} are not "
                               "supported; send text", "messages")
        return "".join(part.text for part in self.content)


class PadOptions(_Strict):
    """``pad: {weight, top_k, echo_guard, reference}``: the strategy's guidance weight,
    candidate count, whether the preference's own words may earn a guidance bonus (pad,
    linear-alignment), and pad's reward reference (one the server's guide runs)."""

    weight: float | None = None
    top_k: int | None = None
    echo_guard: bool = False
    reference: str | None = None


class MixOptions(_Strict):
    """``mix: {weights}`` for the ``mix`` and ``soups`` strategies: ``"pcm"``, ``"uniform"``,
    ``"logit"`` (MOD's logit-space mixture), or one non-negative weight per requested
    expert."""

    weights: str | list[float]

    def setting(self) -> str:
        """As :attr:`padlm.core.config.GenerationConfig.mix` spells it."""
        if isinstance(self.weights, str):
            return self.weights
        return "fixed:" + ",".join(repr(float(w)) for w in self.weights)


class StreamOptions(_Strict):
    include_usage: bool = False


class PadlmOptions(_Strict):
    """``padlm: {explore}``: with ``user`` and ``n=2``, two answers that differ where the
    user's profile is least certain (one side of that axis each), for an A/B choice."""

    explore: bool = False


class ResponseChoice(_Strict):
    """One answer a user saw: a response's ``id`` and the choice's ``index`` in it."""

    id: str = Field(min_length=1, max_length=200)
    index: int = Field(default=0, ge=0)


class HistoryRequest(_Strict):
    """``POST /v1/profiles/{user}/history``: the user's past messages (strings, or chat
    messages of which the user's own turns count)."""

    messages: list[str | ChatMessage] = Field(min_length=1)

    def texts(self) -> list[str]:
        found = [m if isinstance(m, str) else m.text() for m in self.messages
                 if isinstance(m, str) or m.role == "user"]
        found = [text.strip() for text in found if text.strip()]
        if not found:
            raise ApiError(400, "messages hold no user messages", "messages")
        return found


class FeedbackRequest(_Strict):
    """``POST /v1/feedback``: ``user`` preferred ``chosen`` to ``rejected``, or rated one
    ``response`` ``"up"`` or ``"down"``."""

    user: str
    chosen: ResponseChoice | None = None
    rejected: ResponseChoice | None = None
    response: ResponseChoice | None = None
    rating: str | None = None

    def check(self) -> None:
        """Exactly one of the two forms, whole, for a valid user."""
        pair = self.chosen is not None or self.rejected is not None
        rated = self.response is not None or self.rating is not None
        if pair == rated:
            raise ApiError(400, "send either chosen and rejected (a choice between two "
                           "answers) or response and rating (a thumb), not both or neither",
                           "chosen", "invalid_feedback")
        if pair and (self.chosen is None or self.rejected is None):
            raise ApiError(400, "a choice needs both chosen and rejected",
                           "rejected" if self.rejected is None else "chosen",
                           "invalid_feedback")
        if rated and (self.response is None or self.rating not in ("up", "down")):
            raise ApiError(400, "a thumb needs response and rating 'up' or 'down'",
                           "rating" if self.response is not None else "response",
                           "invalid_feedback")


# OpenAI fields padlm cannot honour, and the values that ask for nothing (accepted)
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "web_search_options": (None,),
}


class _Common(_Strict):
    """Fields shared by chat and text completions, OpenAI's and padlm's own."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # padlm's extensions
    preference: str | None = None
    strategy: str | None = Field(default=None, description=(
        "unset: pad with a preference (prompt where this server cannot run pad), base "
        "without one"))
    pad: PadOptions | None = None
    mix: MixOptions | None = None
    best_of: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    ignore_eos: bool = False
    padlm: PadlmOptions | None = None
    token_rewards: bool = Field(default=False, description=(
        "add a non-standard `padlm: {index, token, text, reward}` object to every stream "
        "chunk: the personalized reward of the token just generated"))

    def check(self) -> None:
        """Reject standard fields padlm cannot honour rather than ignore them silently."""
        for name, neutral in UNSUPPORTED_FIELDS.items():
            if getattr(self, name) not in neutral:
                raise ApiError(400, f"{name} is not supported by this server", name,
                               "unsupported_field")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty or "
                               "no_repeat_ngram_size", name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs or self.top_logprobs:
            raise ApiError(400, "logprobs are not supported", "logprobs")


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise ApiError(400, "echo is not supported", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", "logprobs")


def parse_body(model: type[_Strict], raw: bytes) -> _Strict:
    """Validate a raw JSON body; malformed JSON is a 400, a wrong shape or type a 422."""
    try:
        body = model.model_validate_json(raw or b"")
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"request body is not valid JSON: {first['msg']}",
                           code="invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise ApiError(400, "request body must be a JSON object", code="invalid_json"
                           ) from None
        param = _param(first["loc"])
        raise ApiError(422, f"{param}: {first['msg']}" if param else first["msg"], param,
                       code=first["type"]) from None
    body.check()
    return body


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """``messages.0.content`` from pydantic's location, without its union-member tags
    (``str``, ``list[TextPart]``)."""
    parts = [str(p) for p in loc
             if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in str(p))]
    return ".".join(parts) or None


def extra_fields(model: type[_Strict], body: Any) -> list[str]:
    """Top-level keys of a JSON object that no field declares (logged, then ignored)."""
    if not isinstance(body, dict):
        return []
    return sorted(set(body) - set(model.model_fields))
