"""One model's batch of sequences and its KV cache, with rows that can join and leave.

A stream holds ``L`` lanes per request (interleaved: request ``b`` owns rows
``b*L .. b*L+L-1``) so that, for example, Linear Alignment's two contexts or a LoRA PersRM's
``__base__`` / ``persrm`` rows run in ONE batched forward. Rows are left-padded; positions
come from each row's own count of real tokens, so padding never changes a row's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class StreamOutput:
    """Last-position results of a forward: ``[requests, lanes, ...]``."""

    logits: torch.Tensor | None  # None: a stream built with ``logits=False``
    hidden: torch.Tensor


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body whose output is the final (normed) hidden state."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()


def response_hidden(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Whole-sequence counterpart of a stream (scoring finished responses, caching training
    states): ONE right-padded batched forward over ``context + response`` rows; returns each
    response's final hidden states ``[len(response), d]`` (the state at ``t`` predicts
    ``response[t]``). Right padding leaves every real position's output unchanged."""
    ids, mask = _right_padded([[*c, *r] for c, r in zip(contexts, responses, strict=True)],
                              next(model.parameters()).device)
    with torch.inference_mode():
        hidden = decoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return [hidden[i, len(context) - 1:len(context) - 1 + len(response)]
            for i, (context, response) in enumerate(zip(contexts, responses, strict=True))]


def _right_padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def shared_context_hidden(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """:func:`response_hidden` with each distinct context prefilled once: a preference
    pair's chosen and rejected responses follow the same context (an HH-RLHF dialogue, a
    prompt with its preference), often longer than either response, so their rows share one
    KV cache of it. Two forwards: the distinct contexts (right-padded, cached), then every
    response after its context's cache (the padding between them masked, positions
    continuing from the context's real length). Equal to :func:`response_hidden` up to
    float rounding."""
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(c), len(distinct)) for c in contexts]
    device = next(model.parameters()).device
    decoder = decoder_of(model)
    context_ids, context_mask = _right_padded(list(distinct), device)
    context_lengths = torch.tensor([len(c) for c in distinct], device=device)
    rows = torch.tensor(owner, device=device)
    response_ids, response_mask = _right_padded(responses, device)
    with torch.inference_mode():
        first = decoder(input_ids=context_ids, attention_mask=context_mask, use_cache=True)
        last = first.last_hidden_state[torch.arange(len(distinct)), context_lengths - 1]
        cache = first.past_key_values
        cache.batch_select_indices(rows)
        positions = context_lengths[rows, None] + torch.arange(response_ids.shape[1],
                                                                device=device)
        hidden = decoder(input_ids=response_ids, position_ids=positions, past_key_values=cache,
                         attention_mask=torch.cat([context_mask[rows], response_mask], dim=1)
                         ).last_hidden_state
    return [torch.cat([last[owner[i], None], hidden[i, :len(response) - 1]])
            for i, response in enumerate(responses)]


class KVStream:
    """Runs one causal LM over a growing batch, one token per row per step."""

    prefill_type: type[Prefill]  # what prefills its new rows (set below Prefill)

    def __init__(
        self, model: PreTrainedModel, lanes: int = 1, adapters: Sequence[str] | None = None,
        logits: bool = True,
    ) -> None:
        """``logits=False``: run the transformer body only and return hidden states, for
        strategies that make their own logits from them (head experts, soups): the base
        lm_head product per lane would be computed and thrown away."""
        if adapters is not None and len(adapters) != lanes:
            raise ValueError("one adapter name per lane")
        if adapters is not None and not logits:
            raise ValueError("adapter lanes run through the PEFT model, which makes logits")
        self.model = model
        self.logits = logits
        self.lanes = lanes
        self.adapters = list(adapters) if adapters is not None else None
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.next_position = torch.zeros(0, dtype=torch.long, device=self.device)
        self._decoder = decoder_of(model)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
        cache: DynamicCache,
    ) -> StreamOutput:
        if not self.logits:
            with torch.inference_mode():
                hidden = self._decoder(input_ids=input_ids, attention_mask=mask,
                                       position_ids=positions, past_key_values=cache,
                                       use_cache=True).last_hidden_state[:, -1]
            return StreamOutput(None, hidden.view(-1, self.lanes, hidden.shape[-1]))
        kwargs = {}
        if self.adapters is not None:
            kwargs["adapter_names"] = self.adapters * (input_ids.shape[0] // self.lanes)
        captured: list[torch.Tensor] = []
        # The hook lives for one call only: models are shared between many streams.
        handle = self._decoder.register_forward_hook(
            lambda module, args, output: captured.append(output.last_hidden_state[:, -1])
        )
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs,
                )
        finally:
            handle.remove()
        logits = out.logits[:, -1].float()
        hidden = captured[0]
        return StreamOutput(
            logits=logits.view(-1, self.lanes, logits.shape[-1]),
            hidden=hidden.view(-1, self.lanes, hidden.shape[-1]),
        )

    def join(self, contexts: Sequence[Sequence[int]]) -> StreamOutput:
        """Prefill new rows (``len(contexts)`` must be a multiple of ``lanes``) and append
        them to the batch; returns the new rows' outputs."""
        prefill = self.prefill(contexts)
        out = prefill.advance(None)
        prefill.merge()
        return out

    def prefill(self, contexts: Sequence[Sequence[int]]) -> Prefill:
        """New rows to prefill a chunk at a time (:meth:`Prefill.advance`), so a long prompt
        never holds the batch's other rows for the whole of its prefill; they join the batch
        once every chunk has run (:meth:`Prefill.merge`)."""
        if len(contexts) % self.lanes:
            raise ValueError("contexts must come in whole requests")
        return self.prefill_type(self, contexts)

    def step(self, tokens: torch.Tensor) -> StreamOutput:
        """Append one token per request (the same token to all its lanes) and run it."""
        tokens = tokens.to(self.device).repeat_interleave(self.lanes)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        out = self._forward(tokens[:, None], self.mask, self.next_position[:, None], self.cache)
        self.next_position = self.next_position + 1
        return out

    def keep(self, requests: Sequence[int]) -> None:
        """Drop every request not listed, keeping the order of those that are."""
        rows = torch.tensor(
            [r * self.lanes + lane for r in requests for lane in range(self.lanes)],
            dtype=torch.long, device=self.device,
        )
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]
        if self.cache is not None:
            self.cache.batch_select_indices(rows)
        self._trim_left_padding()

    def _trim_left_padding(self) -> None:
        """After rows leave, columns that are padding for everyone are dead weight."""
        if self.rows == 0:
            self.cache = None
            self.mask = self.mask[:, :0]
            return
        live = self.mask.any(dim=0).nonzero()
        first = int(live[0]) if len(live) else self.mask.shape[1]
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        self.cache = _rebuild_cache(
            [(k[:, :, first:], v[:, :, first:]) for k, v in _cache_tensors(self.cache)]
        )

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, next_position: torch.Tensor) -> None:
        if self.cache is None or self.rows == 0:
            self.cache, self.mask, self.next_position = cache, mask, next_position
            return
        width = max(self.mask.shape[1], mask.shape[1])
        merged = [
            (torch.cat([_left_pad(k_old, width), _left_pad(k_new, width)]),
             torch.cat([_left_pad(v_old, width), _left_pad(v_new, width)]))
            for (k_old, v_old), (k_new, v_new)
            in zip(_cache_tensors(self.cache), _cache_tensors(cache), strict=True)
        ]
        self.cache = _rebuild_cache(merged)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.next_position = torch.cat([self.next_position, next_position])


class Prefill:
    """Rows of one stream being prefilled: their left-padded ids and a KV cache of their
    own, which grows chunk by chunk and merges into the stream's batch after the last chunk.
    Chunks of columns give the same attention as one pass (each column sees every earlier
    one through the cache), up to float rounding."""

    def __init__(self, stream: KVStream, contexts: Sequence[Sequence[int]]) -> None:
        self.stream = stream
        width = max(len(c) for c in contexts)
        self.ids = torch.tensor([[0] * (width - len(c)) + list(c) for c in contexts],
                                device=stream.device)
        self.mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts],
                                 device=stream.device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=stream.model.config)
        self.done = 0  # columns prefilled

    @property
    def tokens_left(self) -> int:
        """Positions still to run, padding included (what the next chunks cost)."""
        return self.ids.shape[0] * (self.ids.shape[1] - self.done)

    def advance(self, budget: int | None) -> StreamOutput | None:
        """Run the next chunk of at most ``budget`` positions (at least one column; None:
        all that is left). Returns the rows' last-position outputs once the last chunk has
        run, else None."""
        rows, width = self.ids.shape
        columns = width - self.done if budget is None else max(1, budget // rows)
        end = min(width, self.done + columns)
        out = self.stream._forward(self.ids[:, self.done:end], self.mask[:, :end],
                                   self.positions[:, self.done:end], self.cache)
        self.done = end
        return out if end == width else None

    def merge(self) -> None:
        """Append the prefilled rows to the stream's batch (every chunk has run)."""
        self.stream._merge(self.cache, self.mask, self.positions[:, -1] + 1)

    def keep(self, requests: Sequence[int]) -> None:
        """Drop every request not listed (their clients left mid-prefill)."""
        lanes = self.stream.lanes
        rows = torch.tensor([r * lanes + lane for r in requests for lane in range(lanes)],
                            dtype=torch.long, device=self.stream.device)
        self.ids, self.mask, self.positions = self.ids[rows], self.mask[rows], self.positions[rows]
        if self.done:
            self.cache.batch_select_indices(rows)


KVStream.prefill_type = Prefill


def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    for layer in cache.layers:
        if layer.is_sliding:
            raise NotImplementedError("joining rows into a sliding-window cache")
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rebuild_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=tensors)


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
