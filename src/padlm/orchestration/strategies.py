"""``mix`` (MoPE's per-token mixture of experts) and ``soups`` (Personalized Soups), through
the one decode loop.

``mix``: each row's experts are the lanes of one batched forward; per step the row's weights
``alpha`` (from the PCM, uniform, or fixed) mix the experts' next-token distributions in
probability space, ``log sum_i alpha_i softmax(z_i)`` (``GenerationConfig.mix``: ``pcm`` |
``uniform`` | ``logit`` (MOD-style ``sum_i alpha_i z_i`` with uniform weights, the ablation) |
``fixed:w1,w2,..`` (one weight per requested expert, in the order requested, normalised);
``None`` is ``pcm``). Rows with different combinations and modes share the batch. Each step's
weights are appended to ``row.trace`` as ``{expert: weight}`` (the playground's weight bar).

``soups``: the requested experts' parameters averaged (uniform, or ``fixed:`` weights) into
one model that reads the whole preference in one lane: head experts average ``W_i, b_i``,
LoRA experts average their adapters' matrices (A and B separately, as Personalized Soups
does). Prompted experts share every parameter, so their soup is preference prompting itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

import torch

from padlm.core import guidance
from padlm.core.config import mix_weights
from padlm.core.decoding import Request, Rows
from padlm.core.kvstream import KVStream, StreamOutput
from padlm.core.persrm import ValueHead
from padlm.core.preferences import PRESETS
from padlm.core.registry import StrategySpec, register
from padlm.errors import PadlmError
from padlm.orchestration.encoding import embed_texts
from padlm.orchestration.experts import Experts, add_adapter, engine_experts, lora_state
from padlm.orchestration.streams import AdapterLaneStream, LaneContext

if TYPE_CHECKING:
    from padlm.core.engine import Personalizer

Process = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_MIX = "pcm"


def row_weights(mode: str | tuple[float, ...], count: int, lanes: int) -> torch.Tensor | None:
    """``[lanes]`` weights of a row that is not PCM-mixed (None for ``pcm``): uniform over its
    ``count`` experts, or its fixed weights normalised; filler lanes get 0."""
    if mode == "pcm":
        return None
    if isinstance(mode, tuple):
        if len(mode) != count:
            raise PadlmError(f"fixed mixing weights need one weight per requested expert: "
                             f"{count} experts, {len(mode)} weights", param="mix")
        weights = torch.tensor(mode, dtype=torch.float32) / sum(mode)
    else:  # uniform and logit
        weights = torch.full((count,), 1.0 / count)
    return torch.cat([weights, torch.zeros(lanes - count)])


@dataclass(frozen=True)
class MixRow:
    """A mix row's settings, read once as it joins (``MixStrategy.admit``)."""

    experts: tuple[str, ...]  # the experts it asks for
    lanes: tuple[str, ...]  # its expert per lane (the last repeated as filler)
    mode: str | tuple[float, ...]  # pcm | uniform | logit | fixed weights
    fixed: torch.Tensor | None  # [lanes] weights; None: the PCM's, per step


@register
class MixStrategy:
    """MoPE: the requested experts mixed per token by the PCM (or fixed weights)."""

    spec: ClassVar[StrategySpec] = StrategySpec(
        "mix", "per-dimension experts mixed per token in probability space (MoPE); weights "
        "from the PCM, uniform, logit-space or fixed", uses_experts=True)

    def __init__(self, experts: Experts) -> None:
        self.experts = experts

    @classmethod
    def build(cls, engine: Personalizer) -> MixStrategy:
        return cls(engine_experts(engine))

    def new_streams(self) -> list[KVStream]:
        return self.experts.new_streams()

    def reward_lanes(self, state=None) -> None:
        """No PersRM lane: the playground shows the expert weights instead."""
        return None

    def mode(self, request: Request) -> str | tuple[float, ...]:
        """The request's weighting, checked against what it asks for."""
        # unset: the PCM when these experts have one, else uniform weights (asked for by
        # name, "pcm" without a PCM is an error, not a quiet fallback)
        default = DEFAULT_MIX if self.experts.pcm is not None else "uniform"
        mode = mix_weights(request.config.mix or default)
        if mode == "pcm" and self.experts.pcm is None:
            raise PadlmError("these experts have no trained PCM (padlm train pcm); use mix "
                             "uniform, logit or fixed:w1,w2,...", param="mix")
        row_weights(mode, len(self.experts.select(request.preference)), self.experts.lanes)
        return mode

    def contexts(self, request: Request) -> list[list[list[int]]]:
        self.mode(request)
        return self.experts.contexts(request.prompt, self.experts.select(request.preference))

    def admit(self, request: Request) -> MixRow:
        experts = self.experts.select(request.preference)
        mode = self.mode(request)
        return MixRow(experts, self.experts.lane_experts(experts), mode,
                      row_weights(mode, len(experts), self.experts.lanes))

    def scores(self, outputs: list[StreamOutput], rows: Rows, process: Process
               ) -> torch.Tensor:
        states: list[MixRow] = [row.state for row in rows]
        chosen = [state.experts for state in states]
        lanes = [state.lanes for state in states]
        logits = self.experts.logits(outputs, lanes)
        # repetition control on each expert's proposal, then the mixture
        logits = torch.stack([process(logits[:, j]) for j in range(logits.shape[1])], dim=1)
        modes = [state.mode for state in states]
        alpha = self.weights(outputs, rows, states)
        scores = guidance.mixture_log_probs(logits.log_softmax(-1), alpha)
        in_logit_space = torch.tensor([m == "logit" for m in modes], device=logits.device)
        if in_logit_space.any():
            scores = torch.where(in_logit_space[:, None],
                                 guidance.logit_mixture(logits, alpha), scores)
        for row, ids, weights in zip(rows, chosen, alpha.tolist(), strict=True):
            row.trace.append(dict(zip(ids, weights, strict=False)))
        return scores

    def weights(self, outputs: list[StreamOutput], rows: Rows, states: Sequence[MixRow]
                ) -> torch.Tensor:
        """``[rows, lanes]`` mixing weights on the logits' device: fixed rows as given, PCM
        rows from the PCM (computed where the hidden states are, never round-tripped)."""
        count = self.experts.lanes
        pcm_rows = [i for i, state in enumerate(states) if state.fixed is None]
        alpha = torch.stack([torch.zeros(count) if state.fixed is None else state.fixed
                             for state in states]).to(outputs[0].hidden.device)
        if pcm_rows:
            hidden = self.experts.hidden(outputs, [state.lanes for state in states])[pcm_rows]
            alpha[pcm_rows] = pcm_weights(
                self.experts.pcm, hidden, [rows[i].request.preference.text for i in pcm_rows],
                [states[i].lanes for i in pcm_rows], [len(states[i].experts) for i in pcm_rows]
            ).to(alpha.dtype)
        return alpha


def pcm_weights(pcm, hidden: torch.Tensor, preferences: Sequence[str],
                lanes: Sequence[Sequence[str]], counts: Sequence[int]) -> torch.Tensor:
    """The PCM's weights for hidden states ``[N, lanes, d]`` (decoding and training alike):
    each row's preference and lane experts embedded, filler lanes masked."""
    device = hidden.device
    request = embed_texts(list(preferences)).to(device)
    experts = torch.stack([embed_texts([PRESETS[d] for d in row]) for row in lanes]).to(device)
    valid = torch.arange(hidden.shape[1], device=device)[None, :] < torch.tensor(
        list(counts), device=device)[:, None]
    return pcm(hidden.float(), request, experts, valid)


@register
class SoupsStrategy:
    """Personalized Soups: the requested experts' parameters averaged, one lane."""

    spec: ClassVar[StrategySpec] = StrategySpec(
        "soups", "Personalized Soups: the requested experts' parameters averaged into one "
        "model", uses_experts=True)

    def __init__(self, experts: Experts) -> None:
        if experts.config.form == "models":
            raise PadlmError("soups averages the experts' parameters; whole-model experts would "
                             "need a merged model per combination, which padlm does not build",
                             param="strategy")
        self.experts = experts
        self.lm = experts.lm
        self._soup_head = lru_cache(maxsize=64)(self._average_heads)

    @classmethod
    def build(cls, engine: Personalizer) -> SoupsStrategy:
        return cls(engine_experts(engine))

    def soup(self, request: Request) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The request's experts and their averaging weights (uniform unless fixed)."""
        ids = self.experts.select(request.preference)
        mode = mix_weights(request.config.mix or "uniform")
        if mode in ("pcm", "logit"):
            raise PadlmError("soups averages parameters with uniform or fixed:w1,w2,... "
                             f"weights, not {mode}", param="mix")
        weights = row_weights(mode, len(ids), len(ids))
        return ids, tuple(weights.tolist())

    def reward_lanes(self, state=None) -> None:
        """No PersRM lane: a soup is one averaged model."""
        return None

    def new_streams(self) -> list[KVStream]:
        if self.experts.config.form == "lora":
            return [AdapterLaneStream(self.experts.backbone, 1)]
        # a head soup makes its logits from the hidden state
        return [KVStream(self.lm.model, logits=self.experts.config.form != "head")]

    def admit(self, request: Request) -> tuple[tuple[str, ...], tuple[float, ...]]:
        return self.soup(request)

    def contexts(self, request: Request) -> list[list[list[int]]]:
        ids, weights = self.soup(request)
        context = self.experts.render_request(request.prompt, ids)
        if self.experts.config.form == "lora":
            return [[LaneContext(context, self._soup_adapter(ids, weights))]]
        return [[context]]

    def scores(self, outputs: list[StreamOutput], rows: Rows, process: Process
               ) -> torch.Tensor:
        if self.experts.config.form != "head":
            return process(outputs[0].logits[:, 0])
        hidden = outputs[0].hidden[:, 0]
        transformed = torch.empty_like(hidden)
        soups = [row.state for row in rows]
        for soup in set(soups):
            at = torch.tensor([s == soup for s in soups], device=hidden.device)
            transformed[at] = self._soup_head(*soup)(hidden[at]).to(hidden.dtype)
        lm_head = self.experts.lm_head
        return process((transformed.to(lm_head.dtype) @ lm_head.T).float())

    def _average_heads(self, ids: tuple[str, ...], weights: tuple[float, ...]) -> ValueHead:
        heads = [self.experts.heads[d] for d in ids]
        soup = ValueHead(heads[0].weight.shape[0]).to(heads[0].weight.device)
        with torch.no_grad():
            soup.weight.copy_(guidance.average_parameters([h.weight for h in heads], weights))
            soup.bias.copy_(guidance.average_parameters([h.bias for h in heads], weights))
        return soup

    def _soup_adapter(self, ids: tuple[str, ...], weights: tuple[float, ...]) -> str:
        """The name of an adapter averaging ``ids``' adapters, added on first use."""
        name = "soup-" + "-".join(f"{d}x{w:.4g}" for d, w in zip(ids, weights, strict=True))
        backbone = self.experts.backbone
        if name not in backbone.peft_config:
            states = [lora_state(backbone, d) for d in ids]
            add_adapter(backbone, name, {
                key: guidance.average_parameters([s[key] for s in states], weights)
                for key in states[0]}, self.experts.config.lora)
        return name
