"""Who writes the responses of a preference build: a local model or an OpenAI endpoint.

A sampler turns ``(messages, instruction, seed)`` into text; where the instruction goes is
its own business (a local model uses the placement that works for it, an endpoint a system
message), so the build never formats prompts for a particular model. Pairs are text: the
PersRM's backbone later computes its own hidden states, so the teacher can be any model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from padlm.core.decoding import GenerationConfig, Request
from padlm.core.devices import check_engine
from padlm.core.planning import plan
from padlm.core.preferences import parse_preference
from padlm.core.prompting import Message
from padlm.errors import PadlmError

API_KEY_ENV = "PADLM_SAMPLER_API_KEY"


@dataclass(frozen=True)
class SampleRequest:
    """One response to write: the conversation, the style instruction, its own seed."""

    messages: list[Message]
    instruction: str
    seed: int
    temperature: float


@dataclass(frozen=True)
class Sample:
    text: str
    tokens: int
    cut: bool  # stopped by the token limit


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    top_p: float = 0.9
    no_repeat_ngram_size: int = 3


class Sampler(Protocol):
    name: str  # recorded in every row it wrote
    placement: str
    engine_name: str  # what decoded: hf, vllm, or the endpoint's own server

    def sample(self, requests: Sequence[SampleRequest], settings: SamplingSettings
               ) -> list[Sample]: ...


class LocalSampler:
    """A model in this process, decoded in one batch through the engine's ``prompt``
    strategy: every row has its own seeded generator, so a response depends on its seed
    only, not on which rows shared its batch."""

    engine_name = "hf"

    def __init__(self, engine) -> None:
        self.engine = engine
        self.name = engine.lm.name
        self.placement = engine.placement

    def sample(self, requests: Sequence[SampleRequest], settings: SamplingSettings
               ) -> list[Sample]:
        return self._decode([plan(self.engine, "prompt", Request(
            r.messages, parse_preference(r.instruction), GenerationConfig(
                max_new_tokens=settings.max_new_tokens, temperature=r.temperature,
                top_p=settings.top_p, seed=r.seed,
                no_repeat_ngram_size=settings.no_repeat_ngram_size)))
            for r in requests])

    def _decode(self, batch: list[Request]) -> list[Sample]:
        rows = self.engine.batch("prompt").run(batch)
        return [Sample(row.text, len(row.tokens), row.finish_reason == "length")
                for row in rows]


class VllmSampler(LocalSampler):
    """The same model and contexts on a vLLM engine (``--engine vllm``): vLLM schedules the
    whole chunk at once, continuously batched. Seeded per row too, but with vLLM's own random
    numbers, so its samples differ from the HF engine's for the same seed."""

    engine_name = "vllm"

    def __init__(self, engine) -> None:
        self.engine = engine
        self.name = engine.model_name
        self.placement = engine.placement

    def _decode(self, batch: list[Request]) -> list[Sample]:
        outputs = self.engine.generate_requests(batch, ["prompt"] * len(batch))
        return [Sample(out.text, len(out.tokens), out.finish_reason == "length")
                for out in outputs]


class EndpointSampler:
    """Any OpenAI-compatible chat endpoint (``http(s)://host/v1``); the instruction is a
    system message and only standard fields are sent, so any such server works. Rows are
    requested one at a time (the server batches concurrent users itself)."""

    placement = "system"
    engine_name = "endpoint"

    def __init__(self, base_url: str, model: str | None = None, api_key_env: str = API_KEY_ENV,
                 timeout: float = 600.0) -> None:
        headers = {}
        if os.environ.get(api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                   timeout=timeout)
        self.model = model or self._first_model()
        self.name = f"{base_url.rstrip('/')}#{self.model}"

    def _post(self, path: str, body: dict | None = None) -> dict:
        try:
            response = (self.client.post(path, json=body) if body is not None
                        else self.client.get(path))
        except httpx.HTTPError as error:
            raise PadlmError(f"sampler endpoint {self.client.base_url}: {error}") from None
        if response.status_code != 200:
            raise PadlmError(f"sampler endpoint {self.client.base_url}{path} answered "
                             f"{response.status_code}: {response.text[:300]}")
        return response.json()

    def _first_model(self) -> str:
        models = self._post("/models").get("data") or []
        if not models:
            raise PadlmError(f"sampler endpoint {self.client.base_url} lists no model; name "
                             "one with --sampler-model")
        return models[0]["id"]

    def sample(self, requests: Sequence[SampleRequest], settings: SamplingSettings
               ) -> list[Sample]:
        samples = []
        for request in requests:
            body = {"model": self.model, "max_tokens": settings.max_new_tokens,
                    "temperature": request.temperature, "top_p": settings.top_p,
                    "seed": request.seed,
                    "messages": [{"role": "system", "content": request.instruction},
                                 *request.messages]}
            answer = self._post("/chat/completions", body)
            choice = answer["choices"][0]
            tokens = (answer.get("usage") or {}).get("completion_tokens", 0)
            samples.append(Sample(choice["message"]["content"] or "", tokens,
                                  choice.get("finish_reason") == "length"))
        return samples


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_sampler(spec: str, placement: str | None = None, dtype: str | None = None,
                 endpoint_model: str | None = None, api_key_env: str = API_KEY_ENV,
                 engine: str = "hf") -> Sampler:
    """``spec`` is a URL (an endpoint) or anything ``--model`` takes (alias, directory, hub
    id), decoded by padlm's loop (``engine="hf"``) or vLLM (``"vllm"``). A local model's
    placement defaults to the one measured to work for it."""
    check_engine(engine)
    if is_endpoint(spec):
        if engine != "hf":
            raise PadlmError(f"--engine {engine} applies to a local sampler; the endpoint "
                             f"{spec} decodes on its own server")
        if not spec.rstrip("/").endswith("/v1"):
            raise PadlmError(f"sampler URL {spec} must end in /v1 (an OpenAI-compatible API)")
        return EndpointSampler(spec, endpoint_model, api_key_env)
    from padlm.core.models import preferred_placement

    placement = placement or preferred_placement(spec)
    if engine == "vllm":
        from padlm.vllm.engine import VllmPersonalizer

        return VllmSampler(VllmPersonalizer(spec, persrm="identity", dtype=dtype,
                                            placement=placement))
    from padlm.core.engine import Personalizer

    return LocalSampler(Personalizer(spec, persrm="identity", dtype=dtype,
                                     placement=placement))
