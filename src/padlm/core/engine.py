"""The library's front door: a base model, a PersRM, and every strategy over them.

>>> from padlm import Personalizer                                   # doctest: +SKIP
>>> engine = Personalizer("default")                                  # doctest: +SKIP
>>> engine.generate(["Why is the sky blue?"], preference="P1A", strategy="pad")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from padlm.core.config import GenerationConfig
from padlm.core.decoding import DecodeBatch, Request, Row, StepEvent, Strategy
from padlm.core.devices import AUTO, resolve_device
from padlm.core.guides import check_alignment, load_persrm, persrm_placement
from padlm.core.models import DEFAULT_MODEL, LoadedModel, eos_ids, load_model
from padlm.core.persrm import PersonalizedRewardModel, PersRMConfig
from padlm.core.planning import expansion, plan
from padlm.core.preferences import Preference, PreferenceSource, parse_preference
from padlm.core.prompting import check_placement
from padlm.core.registry import (
    DEFAULT_SCORER,
    check_request,
    check_scorer,
    load_registry,
    strategy_class,
)
from padlm.core.strategies import SequenceScorer, make_scorer
from padlm.errors import PadlmError

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One finished response and what it cost."""

    text: str
    tokens: list[int]
    finish_reason: str
    seconds: float
    score: float | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ServedModel:
    """What a server needs to know of an engine's model, whichever engine decodes."""

    name: str
    tokenizer: object  # a copy for the server's event loop (tokenizers are not thread-safe)
    context_length: int
    vocab_size: int
    persrm_path: str | None  # None: the identity PersRM (or none, on vLLM)
    persrm: PersRMConfig | None
    strategies: tuple[str, ...]
    engine: str  # hf | vllm
    token_rewards: bool  # whether per-token PersRM rewards can be reported
    guide: str | None = None  # a separate guide model's name (None: the base's backbone)


class Personalizer:
    """Holds the frozen models (base, PersRM, sequence scorer) and builds each strategy once.

    Strategies are stateless, so one engine serves any number of decode batches at once;
    every batch owns its KV streams.
    """

    engine_name = "hf"

    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_MODEL,
        persrm: str | PersonalizedRewardModel | None = "default",
        dtype: str | None = None,
        placement: str | None = None,
        scorer: str | SequenceScorer | None = DEFAULT_SCORER,
        device: str = AUTO,
        components: Mapping[str, object] | None = None,
        reference: str | None = None,
        guide_alignment: str = "auto",
        profiles: PreferenceSource | None = None,
    ) -> None:
        """``persrm``: the PersRM or guide (see :func:`padlm.core.guides.load_persrm`), loaded on
        first use, so a guide that cannot steer this model refuses ``pad`` alone.
        ``reference``: PAD's reward reference, overriding the guide's saved one.
        ``scorer``: what scores ``args`` and ``best-of-n``: ``"dimensions"`` (the
        per-dimension reward models, independent of the PersRM; preset preferences only),
        ``"persrm"`` (the PersRM's implicit reward, which PAD follows too), or any
        :class:`~padlm.core.strategies.SequenceScorer` or ``items -> scores`` callable.
        ``guide_alignment``: how a separate guide reads the base's tokens
        (:data:`~padlm.core.guides.GUIDE_ALIGNMENTS`: ``auto`` takes the ids where the guide
        shares the base's vocabulary, else their text).
        ``profiles``: where ``generate(user=...)`` finds the preference of a user who
        states none (:class:`padlm.profiles.service.TenantProfiles`).
        ``components``: settings of the parts plugged-in strategies share, by name (e.g.
        ``{"experts": path}`` for orchestration's ``mix`` and ``soups``; see
        :meth:`component`)."""
        if isinstance(scorer, str):
            check_scorer(scorer)
        if placement is not None:
            check_placement(placement)
        if reference is not None:
            GenerationConfig(reference=reference)  # refused before any model loads
        check_alignment(guide_alignment)  # refused before any model loads
        self.lm = (model if isinstance(model, LoadedModel)
                   else load_model(model, dtype, resolve_device(device)))
        self._persrm: PersonalizedRewardModel | PadlmError | None = None
        self._persrm_spec = persrm
        self._reference = reference
        self._guide_alignment = guide_alignment
        # the user's placement, else the one the PersRM was trained with
        self.placement = placement or persrm_placement(persrm, self.lm.name)
        self._scorer = DEFAULT_SCORER if scorer is None else scorer
        self.eos_ids = eos_ids(self.lm.tokenizer, self.lm.model.generation_config)
        self.components = dict(components or {})
        self.profiles = profiles
        self._built: dict[str, object] = {}
        self._strategies: dict[str, object] = {}
        # the server's handlers and its decode thread may ask for a strategy first at once
        self._building = threading.RLock()

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def model_name(self) -> str:
        return self.lm.name

    @property
    def scorer(self) -> SequenceScorer:
        """The sequence scorer of ``args`` and ``best-of-n``, built on first use."""
        with self._building:
            if not isinstance(self._scorer, SequenceScorer):
                self._scorer = make_scorer(self._scorer, self.lm, self.persrm)
        return self._scorer

    def component(self, name: str, build: Callable[[object], object]) -> object:
        """A part that plugged-in strategies share (orchestration's experts), built on first
        use from its setting in ``components`` (``"default"`` where none is given) and kept.
        The engine holds it without knowing what it is, so the kernel names no feature."""
        with self._building:
            if name not in self._built:
                self._built[name] = build(self.components.get(name, "default"))
            return self._built[name]

    @property
    def persrm(self) -> PersonalizedRewardModel:
        """The PersRM (or separate guide), loaded on first use; a guide that cannot steer this
        model raises its refusal here, every time it is asked for."""
        refusal = self.persrm_refusal()
        if refusal is not None:
            raise refusal
        return self._persrm

    def persrm_refusal(self) -> PadlmError | None:
        """Why ``pad`` cannot run here (None: it can); loads the PersRM to find out."""
        with self._building:
            if self._persrm is None:
                try:
                    self._persrm = load_persrm(self._persrm_spec, self.lm, self._reference,
                                               self._guide_alignment)
                    self._persrm.head.to(self.lm.device)
                except PadlmError as refusal:
                    self._persrm = refusal
        return self._persrm if isinstance(self._persrm, PadlmError) else None

    @property
    def persrm_name(self) -> str:
        return self.persrm.name

    def served_model(self) -> ServedModel:
        config = self.lm.model.config
        refusal = self.persrm_refusal()
        persrm = None if refusal else self.persrm
        strategies = available_strategies()
        if refusal is not None:  # pad is refused by name (engine.check), never offered
            log.warning("pad is not served: %s", refusal)
            strategies = tuple(s for s in strategies if not strategy_class(s).spec.uses_persrm)
        return ServedModel(
            self.lm.name, copy.deepcopy(self.lm.tokenizer),
            int(getattr(config, "max_position_embeddings", 0) or 2048),
            int(self.lm.model.get_output_embeddings().weight.shape[0]),
            persrm.path if persrm else None, persrm.config if persrm else None,
            strategies, "hf", bool(persrm and not persrm.separate),
            persrm.guide.name if persrm and persrm.separate else None)

    def check(self, strategy: str, config: GenerationConfig) -> None:
        """Refuse what ``strategy`` cannot run with ``config`` (the vLLM engine refuses more),
        and ``pad`` where its PersRM cannot steer this model."""
        check_request(strategy, config)
        refusal = self.persrm_refusal() if strategy_class(strategy).spec.uses_persrm else None
        if refusal is not None:
            raise refusal

    def contexts(self, strategy: str, request: Request) -> list[list[list[int]]]:
        """The token ids of every context ``strategy`` decodes for ``request`` (per stream,
        per lane); refuses what the strategy cannot serve (an unknown expert, a bad mix)."""
        return self.strategy(strategy).contexts(request)

    def strategy(self, name: str):
        """The strategy called ``name`` (stateless: built once, then shared by every batch)."""
        with self._building:
            if name not in self._strategies:
                self._strategies[name] = strategy_class(name).build(self)
            return self._strategies[name]

    def batch(self, strategy: str | Strategy) -> DecodeBatch:
        """A new, empty decode batch that requests can join (the server's entry point).
        ``strategy`` is a name, or a strategy object built outside (e.g. PAD over another
        PersRM), so callers never assemble a batch from the engine's parts."""
        chosen = self.strategy(strategy) if isinstance(strategy, str) else strategy
        if chosen.spec.level != "token":
            raise PadlmError(f"{chosen.spec.name} is sequence-level: it decodes through "
                             f"{chosen.sampler} rows, not a batch of its own",
                             param="strategy")
        return DecodeBatch(chosen, self.lm.tokenizer, self.eos_ids)

    def request(self, prompt, preference: str | Preference | None = None,
                config: GenerationConfig | None = None) -> Request:
        return Request(prompt, parse_preference(preference), config or GenerationConfig())

    def preference_of(self, preference: str | Preference | None, user: str | None
                      ) -> Preference:
        """The request's own preference, else (with ``user``) the user's learned one."""
        stated = parse_preference(preference)
        if stated or user is None:
            return stated
        if self.profiles is None:
            raise PadlmError(f"user={user!r} needs profiles: Personalizer(profiles=...)",
                             param="user")
        return self.profiles.preference_for(user)

    def stream(self, prompt, preference: str | None = None, strategy: str = "pad",
               config: GenerationConfig | None = None, user: str | None = None
               ) -> Iterator[StepEvent]:
        """Yield one event per generated token of a single prompt (``user``: decoded for
        that user's profile when no preference is given)."""
        batch = self.batch(strategy)
        request = self.request(prompt, self.preference_of(preference, user), config)
        batch.join([plan(self, strategy, request)])
        while batch.rows:
            yield from batch.step()

    def generate(
        self, prompts: Sequence, preference: str | None = None, strategy: str = "pad",
        config: GenerationConfig | None = None, batch_size: int = 8, n: int = 4,
        on_batch=None, user: str | None = None,
    ) -> list[Generation]:
        """Decode every prompt (in batches) with one strategy; results in prompt order.
        ``n`` is the number of samples of a sequence-level strategy (best-of-n); ``user``:
        decode for that user's profile when no preference is given."""
        chosen = self.preference_of(preference, user)
        requests = [plan(self, strategy, self.request(p, chosen, config)) for p in prompts]
        rows = expansion(self, strategy, n)
        results: list[Generation] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            began = time.perf_counter()
            # best-of-n: every request's samples in ONE decode batch
            picked = rows.pick(self.batch(rows.rows).run(
                [row for request in chunk for row in rows.expand(request)]))
            seconds = (time.perf_counter() - began) / len(chunk)
            results.extend(_as_generation(row, seconds, score) for row, score in picked)
            if on_batch is not None:
                on_batch(len(chunk))
        return results

    def _decode(self, strategy: str, requests: Sequence[Request]) -> list[Row]:
        return self.batch(strategy).run(requests)

    def best_of_n(self, prompt, preference: str | None = None,
                  config: GenerationConfig | None = None, n: int = 4) -> Generation:
        """Sample ``n`` responses to the preference-prompted model; the scorer picks one."""
        return self.generate([prompt], preference, "best-of-n", config, n=n)[0]


def available_strategies() -> tuple[str, ...]:
    """Every registered strategy name, in registry order."""
    return tuple(load_registry())


def _as_generation(row: Row, seconds: float, score: float | None = None) -> Generation:
    return Generation(row.text, list(row.tokens), row.finish_reason or "length", seconds,
                      score)
