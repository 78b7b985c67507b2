"""The methods, each one small class that declares what it needs, plus the one registry.

A strategy says how to score and nothing else: it holds references to frozen models, never a
KV cache. Each :class:`padlm.core.decoding.DecodeBatch` asks it for fresh streams
(:meth:`Strategy.new_streams`), so any number of batches run side by side from one engine.

Every place that lists, validates, routes or reports strategies reads
:data:`padlm.core.registry.REGISTRY` and each class's
:class:`~padlm.core.registry.StrategySpec`; a new method is one class and one ``@register`` line.

Lanes: a stream runs ``L`` contexts per request in one batched forward. A lane is either the
context WITH the preference (``PREFERENCE``) or without it (``NEUTRAL``). A PersRM whose reward
is measured against the preference-free base (``reference: unconditioned``) needs a neutral
lane: :func:`reference_lanes` is the one place that says so.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

import torch

from padlm.core import guidance
from padlm.core.decoding import Request, Row, Rows
from padlm.core.kvstream import KVStream, StreamOutput, response_hidden
from padlm.core.models import LoadedModel, eos_ids
from padlm.core.persrm import (
    ADAPTER_NAME,
    BASE_ADAPTER,
    PersonalizedRewardModel,
    candidate_logits,
)
from padlm.core.prompting import DEFAULT_PLACEMENT, preference_token_ids, render
from padlm.core.registry import (
    NEUTRAL,
    PREFERENCE,
    StrategySpec,
    register,
    register_scorer,
    scorer_factory,
)
from padlm.core.textguide import TextGuideStream
from padlm.errors import PadlmError

if TYPE_CHECKING:
    from padlm.core.engine import Personalizer

DEFAULT_TOP_K = 10
BEST_OF_N_TEMPERATURE = 0.7  # best-of-n needs diverse samples; used when none is given
Process = Callable[[torch.Tensor], torch.Tensor]


def reference_lanes(persrm: PersonalizedRewardModel) -> tuple[str, ...]:
    """The extra lane a PersRM's reward reference needs: none when the reference is the
    preference-conditioned base (it reads lane 0), a neutral lane when it is unconditioned."""
    return (NEUTRAL,) if persrm.reference == "base-unconditioned" else ()


def render_lanes(tokenizer, request: Request, lanes: Sequence[str],
                 placement: str) -> list[list[int]]:
    """Each lane's prompt ids: the request's context with or without its preference."""
    return [render(tokenizer, request.prompt,
                   request.preference.text if lane == PREFERENCE else "", placement)
            for lane in lanes]


@lru_cache(maxsize=1024)
def _guarded_ids(tokenizer, preference: str) -> tuple[int, ...]:
    """Cached: the decode loop asks for a row's ids at every step."""
    return preference_token_ids(tokenizer, preference)


def _echo(rows: Rows, candidates: torch.Tensor, tokenizer) -> torch.Tensor | None:
    """Which candidates are words of their row's preference, for rows with the echo guard."""
    if not any(row.config.echo_guard for row in rows):
        return None
    return guidance.echo_candidates(candidates, [
        torch.tensor(_guarded_ids(tokenizer, row.request.preference.text), dtype=torch.long,
                     device=candidates.device) if row.config.echo_guard else None
        for row in rows])


class Strategy:
    """A method over one stream of ``lanes``: subclasses set ``spec`` and ``scores``."""

    spec: ClassVar[StrategySpec]

    def __init__(self, lm: LoadedModel, lanes: Sequence[str],
                 placement: str = DEFAULT_PLACEMENT, backbone: torch.nn.Module | None = None,
                 adapters: Sequence[str] | None = None) -> None:
        self.lm = lm
        self.lanes = tuple(lanes)
        self.placement = placement
        self.backbone = backbone if backbone is not None else lm.model
        self.adapters = adapters

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def build(cls, engine: Personalizer) -> Strategy:
        raise NotImplementedError

    def new_streams(self) -> list[KVStream]:
        """Fresh, empty streams for one decode batch (the batch owns them)."""
        return [KVStream(self.backbone, lanes=len(self.lanes), adapters=self.adapters)]

    def contexts(self, request: Request) -> list[list[list[int]]]:
        return [render_lanes(self.lm.tokenizer, request, self.lanes, self.placement)]

    def reward_lanes(self, state=None) -> tuple[int, int] | None:
        """(lane whose hidden state the PersRM head reads, lane of its reference logits) for
        the playground's token rewards of a row in ``state`` (its ``row.state``); None where
        this stream cannot give them."""
        return None

    def scores(self, outputs: list[StreamOutput], rows: Rows, process: Process
               ) -> torch.Tensor:
        raise NotImplementedError


@register
class BaseStrategy(Strategy):
    """The base model alone; the preference is ignored."""

    spec = StrategySpec("base", "the base model, preference ignored", lane=NEUTRAL)

    @classmethod
    def build(cls, engine: Personalizer) -> BaseStrategy:
        return cls(engine.lm, (cls.spec.lane,), engine.placement)

    def scores(self, outputs, rows, process):
        return process(outputs[0].logits[:, 0])


@register
class PromptStrategy(BaseStrategy):
    """Preference prompting: the preference placed in the context."""

    spec = StrategySpec("prompt", "the preference placed in the context")


def pad_rules(persrm: PersonalizedRewardModel) -> tuple[str, ...]:
    """The reward references ``pad`` runs for ``persrm``, its own first: that one, and those
    that need no lane of their own (the base with the preference is lane 0; a separate
    guide's log-probabilities need no reference; a head on a separate guide reads its
    backbone's logits from the hidden state it already has)."""
    free = ["base"]
    if persrm.separate:
        free.append("none")
        if not persrm.adapted and not persrm.head.is_identity():
            free.append("guide")
    return tuple(dict.fromkeys([persrm.reference, *free]))


@register
class PadStrategy(Strategy):
    """PAD: ``score(a) = z_b(a) + w * r(a)`` over the base model's top-k candidates, with
    ``r(a) = log softmax_K z_R(a) - log softmax_K z_ref(a)``.

    Lanes of the base stream: the preference-conditioned base (lane 0; on the shared backbone
    the head reads its hidden state too), the PersRM (a LoRA PersRM on the base only) and,
    for the ``base-unconditioned`` reference, the preference-free base. A separate guide
    model is a second stream in lock-step: its PersRM lane (through its adapter, if any), and
    the reference lanes of its own backbone that :func:`pad_rules` asks for. It reads the
    base's token ids where it shares the base's tokenizer; a guide with its own tokenizer
    reads their text instead and scores each candidate's text
    (:class:`~padlm.core.textguide.TextGuideStream`). Each row may pick any rule in
    :attr:`rules`.
    """

    spec = StrategySpec("pad", "PAD: PersRM token rewards re-rank the base top-k",
                        uses_persrm=True, echo_guard=True, weighted=True)

    def __init__(self, lm: LoadedModel, persrm: PersonalizedRewardModel,
                 placement: str | None = None) -> None:
        self.persrm = persrm
        self.rules = pad_rules(persrm)
        lora = persrm.backbone is not None
        lanes = (PREFERENCE, PREFERENCE) if lora else (PREFERENCE,)
        # where each hidden state / reference is read: (stream, lane)
        self.at = {"persrm": (0, len(lanes) - 1), "base": (0, 0)}
        if "base-unconditioned" in self.rules:
            self.at["base-unconditioned"] = (0, len(lanes))
            lanes += (NEUTRAL,)
        adapters = [BASE_ADAPTER, ADAPTER_NAME, BASE_ADAPTER][:len(lanes)] if lora else None
        super().__init__(lm, lanes, placement or persrm.config.placement,
                         persrm.backbone, adapters)
        self.lm_head = lm.model.get_output_embeddings().weight
        if persrm.separate:
            self._guide_lanes()

    def _guide_lanes(self) -> None:
        guide = self.persrm.guide
        self.guide_lanes: tuple[str, ...] = (PREFERENCE,)
        self.at["persrm"] = self.at["guide"] = (1, 0)
        adapters = [ADAPTER_NAME]
        if self.persrm.adapted and "guide" in self.rules:
            self.at["guide"] = (1, len(self.guide_lanes))
            self.guide_lanes += (PREFERENCE,)
            adapters.append(BASE_ADAPTER)
        if "guide-unconditioned" in self.rules:
            self.at["guide-unconditioned"] = (1, len(self.guide_lanes))
            self.guide_lanes += (NEUTRAL,)
            adapters.append(BASE_ADAPTER)
        self.guide_adapters = adapters if self.persrm.adapted else None
        self.guide_head = guide.model.get_output_embeddings().weight

    @classmethod
    def build(cls, engine: Personalizer) -> PadStrategy:
        return cls(engine.lm, engine.persrm, engine.placement)

    def new_streams(self) -> list[KVStream]:
        streams = super().new_streams()
        guide = self.persrm.guide
        if self.persrm.transducer is not None:
            streams.append(TextGuideStream(
                guide.model, self.persrm.transducer,
                eos_ids(guide.tokenizer, guide.model.generation_config), len(self.guide_lanes)))
        elif self.persrm.separate:  # hidden states only, unless PEFT lanes need the full model
            streams.append(KVStream(guide.model, len(self.guide_lanes), self.guide_adapters,
                                    logits=self.persrm.adapted))
        return streams

    def contexts(self, request: Request) -> list[list[list[int]]]:
        self.rule(request)  # refused here, before any decoding
        contexts = super().contexts(request)
        if self.persrm.separate:
            contexts.append(render_lanes(self.persrm.guide.tokenizer, request,
                                         self.guide_lanes, self.persrm.config.placement))
        return contexts

    def rule(self, request: Request) -> str:
        """The reward reference this request uses, or a refusal naming what would run it."""
        asked = request.config.reference or self.persrm.reference
        rule = self.persrm.canonical_reference(asked)
        if rule not in self.rules:
            raise PadlmError(f"reference {asked} needs a lane this engine's pad does not run "
                             f"(PersRM {self.persrm.name} runs {', '.join(self.rules)}): "
                             f"start it with --reference {asked}", param="reference")
        return rule

    def admit(self, request: Request) -> str:
        return self.rule(request)

    def reward_lanes(self, state: str | None = None) -> tuple[int, int] | None:
        stream, lane = self.at.get(state or self.persrm.reference, (None, None))
        if self.persrm.separate or stream != 0:
            return None  # the head reads a second stream, or the row has no reference lane
        return self.at["persrm"][1], lane

    def _reference(self, rule: str, outputs: list[StreamOutput], candidates: torch.Tensor,
                   scoring: torch.Tensor) -> torch.Tensor | None:
        if rule == "none":
            return None
        stream, lane = self.at[rule]
        if stream == 0:
            return outputs[0].logits[:, lane].gather(1, candidates)
        return candidate_logits(outputs[1].hidden[:, lane], self.guide_head, scoring)

    def _text_rewards(self, outputs: list[StreamOutput], candidates: torch.Tensor,
                      rules: list[str]) -> tuple[torch.Tensor, dict]:
        """A guide with its own tokenizer: the PersRM's and each guide-side reference's
        log-probabilities of every candidate's text (:class:`TextGuideOutput`), from one
        scoring pass; base-side references read the base's logits as usual."""
        segments = [self.persrm.transducer.segments(row) for row in candidates.tolist()]
        head = self.guide_head
        readers = {"persrm": (self.at["persrm"][1],
                              lambda hidden: self.persrm.reward_logits(hidden, head))}
        for rule in dict.fromkeys(rules):
            if rule.startswith("guide"):
                readers[rule] = (self.at[rule][1],
                                 lambda hidden: hidden.to(head.dtype) @ head.T)
        scored = outputs[1].candidate_log_probs(segments, list(readers.values()),
                                                self.persrm.first_token_only)
        by_reader = dict(zip(readers, scored.unbind(1), strict=True))
        references = {rule: by_reader[rule] if rule in by_reader
                      else self._reference(rule, outputs, candidates, candidates)
                      for rule in dict.fromkeys(rules)}
        return by_reader["persrm"], references

    def scores(self, outputs, rows, process):
        proposal = process(outputs[0].logits[:, 0])

        def reward(candidates: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            rules = [row.state for row in rows]
            if self.persrm.transducer is not None:
                reward_logits, references = self._text_rewards(outputs, candidates, rules)
                scored = valid
            else:
                scoring, scored = guidance.scoreable_candidates(candidates, valid,
                                                                self.persrm.scoreable)
                stream, lane = self.at["persrm"]
                reward_logits = self.persrm.reward_logits(
                    outputs[stream].hidden[:, lane],
                    self.guide_head if stream else self.lm_head, scoring)
                references = {rule: self._reference(rule, outputs, candidates, scoring)
                              for rule in dict.fromkeys(rules)}
            combined = None
            for rule in dict.fromkeys(rules):
                rule_reward = guidance.pad_token_reward(references[rule], reward_logits,
                                                        scored)
                if combined is None:
                    combined = rule_reward
                    continue
                mine = torch.tensor([r == rule for r in rules], device=proposal.device)
                combined = torch.where(mine[:, None], rule_reward, combined)
            return combined

        return guidance.guided_step(
            proposal, rows.column("top_k", self.persrm.config.top_k or DEFAULT_TOP_K,
                                  proposal.device),
            rows.column("weight", self.persrm.config.recommended_weight, proposal.device),
            reward, lambda candidates: _echo(rows, candidates, self.lm.tokenizer))


@register
class LinearAlignmentStrategy(Strategy):
    """Linear Alignment: ``z_p + alpha (z_p - z_0)``, both contexts in one batched forward."""

    spec = StrategySpec("linear-alignment",
                        "training-free: contexts with and without the preference contrasted",
                        echo_guard=True, weighted=True)

    @classmethod
    def build(cls, engine: Personalizer) -> LinearAlignmentStrategy:
        return cls(engine.lm, (PREFERENCE, NEUTRAL), engine.placement)

    def scores(self, outputs, rows, process):
        preferred, neutral = outputs[0].logits[:, 0], outputs[0].logits[:, 1]
        proposal = process(preferred)
        return guidance.guided_step(
            proposal, rows.column("top_k", DEFAULT_TOP_K, proposal.device),
            rows.column("weight", 1.0, proposal.device),
            lambda candidates, valid: (preferred.gather(1, candidates)
                                       - neutral.gather(1, candidates)),
            lambda candidates: _echo(rows, candidates, self.lm.tokenizer))


@dataclass(frozen=True)
class Scored:
    """One response for a sequence scorer: the request it answers (prompt and preference),
    the prompt ids of each lane the scorer reads (the preference context first, then its own
    :attr:`SequenceScorer.lanes`), and the response's token ids."""

    request: Request
    contexts: Sequence[Sequence[int]]
    response: Sequence[int]


class SequenceScorer:
    """Scores whole responses; higher is better. ARGS and best-of-n take any of these.

    ``__call__`` gets every response to score at once (ARGS: all k continuations of every
    row, one call per step) and returns a ``[len(items)]`` tensor. ``lanes``: the contexts it
    reads besides the preference-conditioned one (ARGS decodes them as extra lanes of its
    stream, best-of-n renders them). :meth:`check` refuses, before any decoding, a request it
    cannot score. ``default_weight``: ARGS's ``w`` where a request sets none (it depends on the
    scale of the reward). A plain callable ``items -> scores`` is wrapped by
    :func:`make_scorer`.
    """

    name = "custom"
    lanes: tuple[str, ...] = ()
    default_weight = 1.0

    def check(self, request: Request) -> None:
        """Refuse a request this scorer cannot score (every request, by default, passes)."""

    def fingerprint(self) -> str:
        """What the scores depend on (evaluation caches key ARGS and best-of-n by it)."""
        return self.name

    def __call__(self, items: Sequence[Scored]) -> torch.Tensor:
        raise NotImplementedError


class CallableScorer(SequenceScorer):
    """Any ``items -> scores`` function as a scorer (no extra lanes, every request passes)."""

    def __init__(self, function: Callable[[Sequence[Scored]], torch.Tensor]) -> None:
        self.function = function

    def __call__(self, items):
        return self.function(items)


class ImplicitRewardScorer(SequenceScorer):
    """The PersRM's summed implicit reward ``sum_t log pi_R(y_t) - log pi_ref(y_t)`` of a
    response, computed by a full forward over context + response (no cache).

    The same reward PAD follows token by token: ARGS or best-of-n with it are PAD's own
    reward searched another way (on a shared backbone, greedy ARGS with it picks exactly
    PAD's tokens), not an independent baseline. A PersRM with an unconditioned reference reads the
    preference-free context too (its ``lanes``).
    """

    name = "persrm"

    def __init__(self, lm: LoadedModel, persrm: PersonalizedRewardModel, batch_size: int = 32):
        self.lm = lm
        self.persrm = persrm
        self.batch_size = batch_size
        self.lanes = reference_lanes(persrm)
        self.default_weight = persrm.config.recommended_weight

    def fingerprint(self) -> str:
        # the PersRM's own: evaluation cells scored by it before the scorer was a choice
        # keep their keys
        return self.persrm.fingerprint()

    def __call__(self, items: Sequence[Scored]) -> torch.Tensor:
        neutral = ([item.contexts[1] for item in items] if self.lanes else None)
        return self.score_ids([item.contexts[0] for item in items],
                              [item.response for item in items], neutral)

    def score_ids(self, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  neutral_contexts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """The rewards of ``responses`` after ``contexts`` (and, for an unconditioned
        reference, the same contexts rendered without the preference)."""
        if self.persrm.reference == "base-unconditioned" and neutral_contexts is None:
            raise PadlmError("this PersRM's reward is measured against the preference-free "
                             "base model: pass neutral_contexts")
        step = self.batch_size
        return torch.cat([
            self._score(contexts[i:i + step], responses[i:i + step],
                        None if neutral_contexts is None else neutral_contexts[i:i + step])
            for i in range(0, len(contexts), step)
        ])

    def _score(self, contexts, responses, neutral_contexts) -> torch.Tensor:
        lm_head = self.lm.model.get_output_embeddings().weight
        base = response_hidden(self.lm.model, contexts, responses)
        if self.persrm.shares_backbone:
            persrm_hidden = base
        else:
            with self.persrm.backbone._enable_peft_forward_hooks(
                    adapter_names=[ADAPTER_NAME] * len(contexts)):
                persrm_hidden = response_hidden(self.persrm.backbone, contexts, responses)
        reference = (response_hidden(self.lm.model, neutral_contexts, responses)
                     if self.persrm.reference == "base-unconditioned" else base)
        scores = []
        with torch.inference_mode():
            for persrm_states, reference_states, response in zip(
                    persrm_hidden, reference, responses, strict=True):
                targets = torch.tensor(list(response), dtype=torch.long,
                                       device=lm_head.device)[:, None]
                persrm_logp = self.persrm.reward_logits(persrm_states, lm_head).log_softmax(-1)
                reference_logp = (reference_states @ lm_head.T).float().log_softmax(-1)
                scores.append((persrm_logp.gather(1, targets)
                               - reference_logp.gather(1, targets)).sum())
        return torch.stack(scores)


def make_scorer(scorer, lm: LoadedModel, persrm: PersonalizedRewardModel) -> SequenceScorer:
    """A scorer from its name (:data:`padlm.core.registry.SCORERS`), or any scorer or callable."""
    if isinstance(scorer, SequenceScorer):
        return scorer
    if callable(scorer):
        return CallableScorer(scorer)
    return scorer_factory(scorer)(lm, persrm)


def implicit_reward_scorer(lm: LoadedModel, persrm: PersonalizedRewardModel
                           ) -> ImplicitRewardScorer:
    if persrm.separate:
        raise PadlmError(f"--scorer persrm scores with a head on the base model; the guide "
                         f"{persrm.name} is a separate model, which scores pad only: use "
                         f"--scorer dimensions", param="scorer")
    return ImplicitRewardScorer(lm, persrm)


register_scorer("persrm", implicit_reward_scorer)


@register
class ArgsStrategy(Strategy):
    """ARGS: ``score(a) = z(a) + w * R(prefix + a)`` for each of the top-k candidates.

    ``R`` is the engine's sequence scorer: by default the per-dimension reward models
    (:class:`padlm.orchestration.scoring.DimensionScorer`), independent of the PersRM, called
    on all k continuations of every row at every step, batched (the method's real cost).
    With the PersRM's implicit reward (``--scorer persrm``) on a shared backbone the k
    sequence rewards are exact and incremental: ``R(prefix + a) = R(prefix) + log pi_R(a|s)
    - log pi_ref(a|s)``, so the k scorer calls cost one head product; ``R(prefix)`` is the
    same for every candidate of a row, so it changes neither the argmax nor the softmax and
    is left out. That is PAD's
    score up to a per-row constant: greedy ARGS with the PersRM picks PAD's tokens.
    """

    spec = StrategySpec("args", "reward-guided search: each top-k candidate's response so "
                        "far scored by a sequence reward (default: the per-dimension reward "
                        "models, not the PersRM; --scorer persrm: the PersRM's)",
                        uses_scorer=True, weighted=True)

    def __init__(self, lm: LoadedModel, scorer: SequenceScorer,
                 placement: str = DEFAULT_PLACEMENT, default_weight: float | None = None
                 ) -> None:
        super().__init__(lm, (PREFERENCE, *scorer.lanes), placement)
        self.scorer = scorer
        self.default_weight = scorer.default_weight if default_weight is None \
            else default_weight
        self.neutral = NEUTRAL in self.lanes
        self.incremental = (isinstance(scorer, ImplicitRewardScorer)
                            and scorer.persrm.shares_backbone)

    @classmethod
    def build(cls, engine: Personalizer) -> ArgsStrategy:
        return cls(engine.lm, engine.scorer, engine.placement)

    def contexts(self, request: Request) -> list[list[list[int]]]:
        self.scorer.check(request)  # refused here, before any decoding
        return super().contexts(request)

    def scores(self, outputs, rows, process):
        logits = outputs[0].logits[:, 0]
        proposal = process(logits)
        k = rows.column("top_k", DEFAULT_TOP_K, proposal.device)
        candidates, valid = guidance.top_k_candidates(proposal, k)
        if self.incremental:
            rewards = self._token_gain(outputs[0]).gather(1, candidates)
        else:
            rewards = self.scorer([  # all k continuations of every row, in one call
                Scored(row.request, row.contexts[0], row.tokens + [int(c)])
                for row, cands in zip(rows, candidates.tolist(), strict=True) for c in cands
            ]).view(candidates.shape).float().to(proposal.device)
        weights = rows.column("weight", self.default_weight, proposal.device)
        scores = (proposal.gather(1, candidates) + weights[:, None] * rewards
                  ).masked_fill(~valid, guidance.NEG_INF)
        return guidance.scatter_to_vocab(candidates, scores, proposal.shape[-1])

    def _token_gain(self, out: StreamOutput) -> torch.Tensor:
        lm_head = self.lm.model.get_output_embeddings().weight
        persrm_logits = self.scorer.persrm.reward_logits(out.hidden[:, 0], lm_head)
        reference = out.logits[:, 1 if self.neutral else 0]
        return persrm_logits.log_softmax(-1) - reference.log_softmax(-1)


@register
class BestOfNStrategy:
    """Best-of-n: ``n`` samples from the preference-prompted model, the scorer keeps one.

    Sequence-level: its samples decode as ordinary ``prompt`` rows (so they share a batch with
    anyone), and :meth:`pick` scores the finished rows. Every sample has its own seed, so a
    prompt's samples are the same whatever else shares the batch.
    """

    spec = StrategySpec("best-of-n", "n prompted samples, a sequence reward picks one "
                        "(default: the per-dimension reward models; --scorer persrm: the "
                        "PersRM's)", uses_scorer=True, level="sequence")
    sampler = "prompt"

    def __init__(self, lm: LoadedModel, scorer: SequenceScorer,
                 placement: str = DEFAULT_PLACEMENT) -> None:
        self.lm = lm
        self.scorer = scorer
        self.placement = placement
        self.lanes = (PREFERENCE, *scorer.lanes)

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def build(cls, engine: Personalizer) -> BestOfNStrategy:
        return cls(engine.lm, engine.scorer, engine.placement)

    def sample_requests(self, request: Request, n: int) -> list[Request]:
        """The ``n`` sampled rows that stand for one best-of-n request."""
        if n < 1:
            raise PadlmError(f"n must be >= 1, got {n}", param="n")
        self.scorer.check(request)  # refused here, before any sample is decoded
        config = request.config
        if config.temperature == 0:
            config = replace(config, temperature=BEST_OF_N_TEMPERATURE)
        # a fresh seed without touching torch's global generator (other threads use it)
        seed = config.seed if config.seed is not None else secrets.randbits(31)
        return [replace(request, config=replace(config, seed=seed + i)) for i in range(n)]

    def pick_many(self, samples: Sequence[Row], n: int) -> list[tuple[Row, float]]:
        """Score ``len(samples) // n`` requests' samples in one scorer call."""
        lanes = [render_lanes(self.lm.tokenizer, row.request, self.lanes, self.placement)
                 for row in samples]
        scores = self.scorer([Scored(row.request, contexts, row.tokens)
                              for row, contexts in zip(samples, lanes, strict=True)]
                             ).view(-1, n)
        picked = []
        for index, row_scores in enumerate(scores):
            best = int(row_scores.argmax())
            picked.append((samples[index * n + best], float(row_scores[best])))
        return picked
