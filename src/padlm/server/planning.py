"""Planning a request: everything a client can get wrong is refused here, before it queues.

A :class:`Planner` checks a parsed body against the loaded model and the server's limits and
renders every context its rows decode, on one thread of its own (off the event loop), so
that no request can fail in the decode loop for a reason the client could have been told.
Refusals are :class:`~padlm.server.schemas.ApiError` 400s naming the request's field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from padlm.core.config import SEED_LIMIT, GenerationConfig
from padlm.core.decoding import Request as DecodeRequest
from padlm.core.engine import ServedModel
from padlm.core.planning import Expansion, expansion, plan
from padlm.core.preferences import Preference, parse_preference
from padlm.core.registry import strategy_class
from padlm.engines import Engine
from padlm.errors import PadlmError
from padlm.profiles.service import ProfileError, ProfileService
from padlm.server.schemas import ApiError, ChatCompletionRequest
from padlm.server.settings import ServerSettings

DEFAULT_MAX_TOKENS = 128  # when a request names none (capped by the room left in the context)
DEFAULT_BEST_OF = 4
MAX_STOP = 4  # as in OpenAI's API
# the decode step's precision (top_p, mix weights): its smallest normal and largest values,
# as Python floats (compared in float64, nothing is cast)
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)

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
    expansion: Expansion  # the rows' token-level strategy; best-of-n's sampling and picking
    preference: Preference
    prompts: list = field(default_factory=list)  # choice c answers prompts[c // n]
    n: int = 1
    # a user of a server with profiles: the answers are remembered for their feedback, also
    # when the request states its own preference (then ``profile`` is None: not applied)
    user: str | None = None
    profile: dict | None = None  # the profile state it was decoded with (padlm.profile)


class Planner:
    """Turns a request body into a :class:`Plan` or a 400, for one served model."""

    def __init__(self, engine: Engine, settings: ServerSettings,
                 served: ServedModel, profiles: ProfileService | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.served = served
        self.profiles = profiles
        # planning (render, tokenize, embed a mix preference) is CPU work proportional to the
        # request: it runs here, off the event loop so that no request stalls the others'
        # streams, and on one thread so that no tokenizer is ever used by two planner threads
        # (the decode thread has its own)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="padlm-plan")
        self.context_length = served.context_length
        self.vocab_size = served.vocab_size

    async def plan_off_loop(self, body, prompts: Sequence, prompt_param: str,
                            tenant: str) -> Plan:
        """:meth:`plan` on the planner thread, after the size caps (checked here, on the
        loop: they are cheap, and a flood of huge requests is refused before it queues up
        for the planner)."""
        self.check_sizes(body, prompts, prompt_param)
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.plan, body, prompts, prompt_param, tenant)

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

    def plan(self, body, prompts: Sequence, prompt_param: str, tenant: str) -> Plan:
        """Check everything a client can get wrong before any decoding starts, against the
        loaded model and the server's limits, so no request can fail in the decode loop."""
        try:
            preference = parse_preference(body.preference)
        except PadlmError as error:
            raise ApiError(400, str(error), "preference", "unknown_preference") from None
        preferences, profile = self._profile(body, tenant, preference)
        if len(preferences) == 1:  # the request's own, or its user's profile's
            preference = preferences[0]
        strategy = self.strategy_of(body, preferences[0])
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
        config = self._config(body, stop)
        self._check_bounds(config, body.n * best_of)
        if body.token_rewards and not self.served.token_rewards:
            raise ApiError(400, f"token_rewards cannot be reported by the {self.served.engine} "
                           "engine (the PersRM runs inside it); use padlm serve --engine hf",
                           "token_rewards")
        requests, prompt_tokens, prefill_tokens = [], 0, 0
        for prompt in prompts:
            renders = {choice: self._plan(DecodeRequest(prompt, choice, config), strategy,
                                          prompt_param).rendered
                       for choice in dict.fromkeys(preferences)}
            # after the engine's check, which refuses what it cannot run (best-of-n on vLLM)
            rows = expansion(self.engine, strategy, best_of)
            # each choice's rows prefill every lane of its own contexts
            lane_tokens = {choice: [len(lane) for lanes in rendered.contexts for lane in lanes]
                           for choice, rendered in renders.items()}
            choices = [preferences[i % len(preferences)] for i in range(body.n)]
            length = max(max(tokens) for tokens in lane_tokens.values())
            room = self.context_length - length
            wanted = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, room,
                                                                   cap)
            if length + max(wanted, 1) > self.context_length:
                raise ApiError(400, f"this model's maximum context length is "
                               f"{self.context_length} tokens; the prompt has {length} and "
                               f"{wanted} more were requested", prompt_param,
                               "context_length_exceeded")
            # after the model's own limit, which a client can act on alone
            lanes = max(sum(tokens) for tokens in lane_tokens.values())
            prefill_tokens += sum(sum(lane_tokens[c]) for c in choices) * best_of
            if prefill_tokens > self.settings.max_prompt_tokens:
                raise ApiError(400, f"this request would prefill {prefill_tokens} or more "
                               f"prompt tokens (each prompt's {lanes} over its lanes, times "
                               f"{body.n * best_of} rows); the server's limit is "
                               f"{self.settings.max_prompt_tokens} (--max-prompt-tokens)",
                               prompt_param, "prompt_too_long")
            prompt_tokens += length
            for i, choice in enumerate(choices):
                seed = None if config.seed is None else config.seed + i * best_of
                # rendered once, above: the decode thread renders nothing again
                request = DecodeRequest(prompt, choice, replace(
                    config, max_new_tokens=wanted, seed=seed), renders[choice])
                try:  # best-of-n's scorer refuses what it cannot score (free text)
                    requests.extend(rows.expand(request))
                except PadlmError as error:
                    raise ApiError(400, str(error), error.param or prompt_param) from None
        return Plan(requests, len(prompts) * body.n, prompt_tokens, prefill_tokens, strategy,
                    rows, preference, list(prompts), body.n,
                    body.user if self.profiles is not None and body.user else None, profile)

    def _profile(self, body, tenant: str, preference: Preference
                 ) -> tuple[list[Preference], dict | None]:
        """The preferences the request's choices decode with, and the profile state behind
        them: the request's own preference wins; a ``user`` without one decodes for the
        user's profile (``padlm.explore``: two that differ where the profile is least sure)."""
        explore = bool(body.padlm and body.padlm.explore)
        if explore:
            problem = (
                "needs a server with profiles (padlm serve --profiles)" if self.profiles is None
                else "needs user" if not body.user
                else "needs n=2" if body.n != 2
                else "decodes for the profile, so it takes no preference"
                if preference else None)
            if problem:
                raise ApiError(400, f"padlm.explore {problem}", "padlm.explore")
        if self.profiles is None or not body.user or preference:
            return [preference], None
        try:
            if explore:
                return self.profiles.exploring(tenant, body.user)
            decoded, profile = self.profiles.decoding(tenant, body.user)
        except ProfileError as error:
            raise ApiError(error.status, str(error), error.param, error.code) from None
        return [decoded], profile

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

    def strategy_of(self, body, preference: Preference) -> str:
        """The request's strategy; one that names none gets the server's default, or
        ``base`` without a preference: a plain OpenAI client (an LLM judge, say) gets the
        base model on every engine, not PAD toward an empty preference."""
        if body.strategy is not None:
            return body.strategy
        return self.default_strategy if preference else "base"

    def _config(self, body, stop: list[str]) -> GenerationConfig:
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
        except PadlmError as error:
            raise ApiError(400, str(error), _PARAM_OF.get(error.param, error.param)) from None
        return config

    def _plan(self, request: DecodeRequest, strategy: str, param: str) -> DecodeRequest:
        """The shared planner (:func:`padlm.core.planning.plan`) on one prompt of this request:
        its settings checked against the strategy and the engine, and every context the
        strategy builds for its rows (their lanes' own preference texts and placements)
        rendered once here and carried to the decode thread; a request the strategy cannot
        serve (an unknown expert, a bad mix) is refused before it is queued."""
        try:
            return plan(self.engine, strategy, request)
        except PadlmError as error:
            raise ApiError(400, str(error), _PARAM_OF.get(error.param, error.param or param)
                           ) from None


def _check_float32_weights(weights: Sequence[float]) -> None:
    """Fixed mix/soups weights are normalised in float64 (:func:`padlm.core.config.mix_weights`),
    but the decode step, and the ``mix_weights`` a response reports, are float32: a weight
    float32 cannot hold (``1e300`` overflows to infinity, ``1e-50`` rounds to 0) would be
    decoded as some other weight than the one sent, so it is refused, naming the field."""
    for weight in weights:
        if weight != 0 and not FLOAT32_TINY <= abs(weight) <= FLOAT32_MAX:
            raise ApiError(400, f"mix.weights must each be 0 or between {FLOAT32_TINY:.3g} "
                           f"and {FLOAT32_MAX:.3g} (float32), got {weight!r}", "mix.weights")
