"""The token-level methods, each a small adapter between its models and the decode loop.

``base`` and ``prompt`` read one stream. ``pad`` reads the base logits and the PersRM's value
head (on the shared backbone: one forward; with a LoRA PersRM: two lanes of one batched
forward; a PersRM with an unconditioned reference adds a preference-free lane).
``linear-alignment`` reads two lanes (with / without the preference). ``args``
scores each top-k candidate with a sequence-level scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Protocol

import torch

from padlm import guidance
from padlm.decoding import Request, Row
from padlm.errors import PadlmError
from padlm.kvstream import KVStream, StreamOutput, response_hidden
from padlm.models import LoadedModel
from padlm.persrm import ADAPTER_NAME, BASE_ADAPTER, PersonalizedRewardModel
from padlm.prompting import DEFAULT_PLACEMENT, preference_token_ids, render

DEFAULT_TOP_K = 10
Process = Callable[[torch.Tensor], torch.Tensor]


def _top_k(rows: Sequence[Row], default: int) -> torch.Tensor:
    return torch.tensor([row.config.top_k or default for row in rows])


def _weights(rows: Sequence[Row], default: float) -> torch.Tensor:
    return torch.tensor(
        [default if row.config.weight is None else row.config.weight for row in rows]
    )


@lru_cache(maxsize=1024)
def _guarded_ids(tokenizer, preference: str) -> torch.Tensor:
    """Cached: the decode loop asks for a row's ids at every step."""
    return torch.tensor(preference_token_ids(tokenizer, preference), dtype=torch.long)


def _echo(rows: Sequence[Row], candidates: torch.Tensor, tokenizer) -> torch.Tensor | None:
    """Which candidates are words of their row's preference, for rows with the echo guard."""
    if not any(row.config.echo_guard for row in rows):
        return None
    return guidance.echo_candidates(candidates, [
        _guarded_ids(tokenizer, row.request.preference) if row.config.echo_guard else None
        for row in rows])


class PlainStrategy:
    """``base`` (preference ignored) and ``prompt`` (preference placed in the context)."""

    def __init__(self, lm: LoadedModel, use_preference: bool,
                 placement: str = DEFAULT_PLACEMENT) -> None:
        self.name = "prompt" if use_preference else "base"
        self.lm = lm
        self.use_preference = use_preference
        self.placement = placement
        self.streams = [KVStream(lm.model)]

    def contexts(self, request: Request) -> list[list[list[int]]]:
        preference = request.preference if self.use_preference else ""
        return [[render(self.lm.tokenizer, request.prompt, preference, self.placement)]]

    def scores(self, outputs: list[StreamOutput], rows: Sequence[Row],
               process: Process) -> torch.Tensor:
        return process(outputs[0].logits[:, 0])


class PadStrategy:
    """PAD: ``score(a) = z_b(a) + w * r(a)`` over the base model's top-k candidates.

    Lanes of the one stream: the preference-conditioned base (lane 0; on the shared backbone
    the head reads its hidden state too), the PersRM (a LoRA PersRM only) and, for a PersRM
    with an unconditioned reference, the preference-free base that ``r`` is measured against.
    """

    name = "pad"

    def __init__(self, lm: LoadedModel, persrm: PersonalizedRewardModel,
                 placement: str | None = None) -> None:
        self.lm = lm
        self.persrm = persrm
        self.placement = placement or persrm.config.placement
        self.lm_head = lm.model.get_output_embeddings().weight
        adapters = [BASE_ADAPTER] if persrm.shares_backbone else [BASE_ADAPTER, ADAPTER_NAME]
        self.persrm_lane = len(adapters) - 1
        if persrm.config.unconditioned:
            adapters.append(BASE_ADAPTER)
        self.reference_lane = len(adapters) - 1 if persrm.config.unconditioned else 0
        backbone = lm.model if persrm.shares_backbone else persrm.backbone
        self.streams = [KVStream(backbone, lanes=len(adapters),
                                 adapters=None if persrm.shares_backbone else adapters)]

    def contexts(self, request: Request) -> list[list[list[int]]]:
        ids = render(self.lm.tokenizer, request.prompt, request.preference, self.placement)
        lanes = [ids] * (self.persrm_lane + 1)
        if self.reference_lane:
            lanes.append(render(self.lm.tokenizer, request.prompt, "", self.placement))
        return [lanes]

    def scores(self, outputs: list[StreamOutput], rows: Sequence[Row],
               process: Process) -> torch.Tensor:
        out = outputs[0]
        base_logits = out.logits[:, 0]
        proposal = process(base_logits)
        k = _top_k(rows, self.persrm.config.top_k or DEFAULT_TOP_K)
        candidates, valid = guidance.top_k_candidates(proposal, k)
        reward_logits = self.persrm.reward_logits(out.hidden[:, self.persrm_lane],
                                                  self.lm_head, candidates)
        scores = guidance.pad_scores(
            out.logits[:, self.reference_lane].gather(1, candidates), reward_logits,
            _weights(rows, self.persrm.config.recommended_weight), valid,
            proposal.gather(1, candidates), _echo(rows, candidates, self.lm.tokenizer),
        )
        return guidance.scatter_to_vocab(candidates, scores, proposal.shape[-1])


class LinearAlignmentStrategy:
    """Linear Alignment: ``z_p + alpha (z_p - z_0)``, both contexts in one batched forward."""

    name = "linear-alignment"

    def __init__(self, lm: LoadedModel, placement: str = DEFAULT_PLACEMENT) -> None:
        self.lm = lm
        self.placement = placement
        self.streams = [KVStream(lm.model, lanes=2)]

    def contexts(self, request: Request) -> list[list[list[int]]]:
        tokenizer = self.lm.tokenizer
        return [[render(tokenizer, request.prompt, request.preference, self.placement),
                 render(tokenizer, request.prompt, "", self.placement)]]

    def scores(self, outputs: list[StreamOutput], rows: Sequence[Row],
               process: Process) -> torch.Tensor:
        preferred, neutral = outputs[0].logits[:, 0], outputs[0].logits[:, 1]
        proposal = process(preferred)
        candidates, valid = guidance.top_k_candidates(proposal, _top_k(rows, DEFAULT_TOP_K))
        scores = guidance.linear_alignment_scores(
            preferred.gather(1, candidates), neutral.gather(1, candidates),
            _weights(rows, 1.0), valid, proposal.gather(1, candidates),
            _echo(rows, candidates, self.lm.tokenizer),
        )
        return guidance.scatter_to_vocab(candidates, scores, proposal.shape[-1])


class SequenceScorer(Protocol):
    """Scores whole responses; higher is better. ARGS and best-of-n accept any of these."""

    def __call__(self, contexts: Sequence[Sequence[int]],
                 responses: Sequence[Sequence[int]]) -> torch.Tensor: ...


class ImplicitRewardScorer:
    """The PersRM's summed implicit reward ``sum_t log pi_R(y_t) - log pi_ref(y_t)`` of a
    response, computed by a full forward over context + response (no cache).

    A PersRM with an unconditioned reference needs ``neutral_contexts``: the same contexts
    rendered without the preference, which its reference reads.
    """

    def __init__(self, lm: LoadedModel, persrm: PersonalizedRewardModel, batch_size: int = 32):
        self.lm = lm
        self.persrm = persrm
        self.batch_size = batch_size

    def __call__(self, contexts: Sequence[Sequence[int]],
                 responses: Sequence[Sequence[int]],
                 neutral_contexts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        if self.persrm.config.unconditioned and neutral_contexts is None:
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
                     if self.persrm.config.unconditioned else base)
        scores = []
        with torch.inference_mode():
            for persrm_states, reference_states, response in zip(
                    persrm_hidden, reference, responses, strict=True):
                targets = torch.tensor(list(response), dtype=torch.long)[:, None]
                persrm_logp = self.persrm.reward_logits(persrm_states, lm_head).log_softmax(-1)
                reference_logp = (reference_states @ lm_head.T).float().log_softmax(-1)
                scores.append((persrm_logp.gather(1, targets)
                               - reference_logp.gather(1, targets)).sum())
        return torch.stack(scores)


class ArgsStrategy:
    """ARGS: ``score(a) = z(a) + w * R(prefix + a)`` for each of the top-k candidates.

    With the default scorer on a shared-backbone PersRM the k sequence rewards are exact and
    incremental: ``R(prefix + a) = R(prefix) + log pi_R(a|s) - log pi_ref(a|s)``, so the k
    scorer calls cost one head product; ``R(prefix)`` is the same for every candidate of a
    row, so it changes neither the argmax nor the softmax and is left out. Any other scorer
    is called on all k continuations of every row, batched (the method's real cost). A
    PersRM with an unconditioned reference adds a preference-free lane for that reference.
    """

    name = "args"

    def __init__(self, lm: LoadedModel, scorer: SequenceScorer,
                 placement: str = DEFAULT_PLACEMENT, default_weight: float = 1.0) -> None:
        self.lm = lm
        self.scorer = scorer
        self.placement = placement
        self.default_weight = default_weight
        implicit = isinstance(scorer, ImplicitRewardScorer)
        self.neutral = implicit and scorer.persrm.config.unconditioned
        self.streams = [KVStream(lm.model, lanes=2 if self.neutral else 1)]
        self.incremental = implicit and scorer.persrm.shares_backbone

    def contexts(self, request: Request) -> list[list[list[int]]]:
        tokenizer = self.lm.tokenizer
        lanes = [render(tokenizer, request.prompt, request.preference, self.placement)]
        if self.neutral:
            lanes.append(render(tokenizer, request.prompt, "", self.placement))
        return [lanes]

    def scores(self, outputs: list[StreamOutput], rows: Sequence[Row],
               process: Process) -> torch.Tensor:
        logits = outputs[0].logits[:, 0]
        proposal = process(logits)
        candidates, valid = guidance.top_k_candidates(proposal, _top_k(rows, DEFAULT_TOP_K))
        if self.incremental:
            rewards = self._token_gain(outputs[0]).gather(1, candidates)
        else:
            per_row = candidates.shape[1]
            contexts = [row.contexts[0][0] for row in rows for _ in range(per_row)]
            continuations = [row.tokens + [int(c)] for row, cands in zip(rows, candidates,
                                                                         strict=True)
                             for c in cands]
            extra = ({"neutral_contexts": [row.contexts[0][1] for row in rows
                                           for _ in range(per_row)]} if self.neutral else {})
            rewards = self.scorer(contexts, continuations, **extra).view(
                candidates.shape).float()
        scores = (proposal.gather(1, candidates) + _weights(rows, self.default_weight)[:, None]
                  * rewards).masked_fill(~valid, guidance.NEG_INF)
        return guidance.scatter_to_vocab(candidates, scores, proposal.shape[-1])

    def _token_gain(self, out: StreamOutput) -> torch.Tensor:
        lm_head = self.lm.model.get_output_embeddings().weight
        persrm_logits = self.scorer.persrm.reward_logits(out.hidden[:, 0], lm_head)
        reference = out.logits[:, 1 if self.neutral else 0]
        return persrm_logits.log_softmax(-1) - reference.log_softmax(-1)
