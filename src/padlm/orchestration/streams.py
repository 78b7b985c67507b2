"""A KV stream whose rows each run their own LoRA adapter, so LoRA experts of different
combinations share ONE batched forward.

:class:`padlm.core.kvstream.KVStream` fixes one adapter per lane for every request. A mixture
request's lane ``j`` runs whichever expert that request put ``j``-th, so the adapter is a
property of the row, not of the lane: each context arrives as a :class:`LaneContext` naming
its adapter, and the stream keeps the names aligned with its rows as rows join and leave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from padlm.core.kvstream import KVStream, Prefill, StreamOutput


class LaneContext(list):
    """A lane's prompt token ids, plus the name of the adapter the lane runs."""

    def __init__(self, ids: Sequence[int], adapter: str) -> None:
        super().__init__(ids)
        self.adapter = adapter


class AdapterPrefill(Prefill):
    """A prefill whose forwards run its own rows' adapters (the batch's rows are not in
    them); its adapter names join the stream's with its rows."""

    stream: AdapterLaneStream

    def __init__(self, stream: AdapterLaneStream, contexts: Sequence[Sequence[int]]) -> None:
        super().__init__(stream, contexts)
        self.names = [context.adapter for context in contexts]

    def advance(self, budget: int | None) -> StreamOutput | None:
        running, self.stream._running = self.stream._running, self.names
        try:
            return super().advance(budget)
        finally:
            self.stream._running = running

    def merge(self) -> None:
        kept = self.stream.row_adapters if self.stream.rows else []
        super().merge()
        self.stream.row_adapters = self.stream._running = kept + self.names

    def keep(self, requests: Sequence[int]) -> None:
        lanes = self.stream.lanes
        self.names = [self.names[r * lanes + lane] for r in requests for lane in range(lanes)]
        super().keep(requests)


class AdapterLaneStream(KVStream):
    """KV stream over a PEFT model with a per-row adapter (PEFT's mixed-adapter batch)."""

    prefill_type = AdapterPrefill

    def __init__(self, model: torch.nn.Module, lanes: int) -> None:
        super().__init__(model, lanes)
        self.row_adapters: list[str] = []  # one per cached row, in row order
        self._running: list[str] = []  # the rows of the forward under way

    def keep(self, requests: Sequence[int]) -> None:
        self.row_adapters = self._running = [self.row_adapters[r * self.lanes + lane]
                                             for r in requests for lane in range(self.lanes)]
        super().keep(requests)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> StreamOutput:
        with self.model._enable_peft_forward_hooks(adapter_names=self._running):
            return super()._forward(input_ids, mask, positions, cache)

