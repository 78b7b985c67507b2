"""A guide model with its own tokenizer, in lock-step with the base: it reads the base's
chosen tokens as their bytes (:mod:`padlm.core.transduction`), and scores each base
candidate as the log-probability of the candidate's bytes, however many guide tokens they
take.

A candidate written as guide tokens ``g1 .. gm`` after the committed context scores
``log p(g1 | ctx) + sum_{j>=2} log p(gj | ctx, g1..g(j-1))``. The first term comes from the
guide's last-position output, which the lock-step already has; the rest from ONE extension
forward per step over every candidate of more than one token, all of a row's candidates
side by side after its KV cache, each attending to the cache and to its own earlier tokens
only (a 4D mask). The cache is cut back afterwards: nothing is recomputed, and nothing
candidate-specific stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from padlm.core.kvstream import KVStream, StreamOutput
from padlm.core.transduction import END, Transducer

# how a lane's final hidden states [n, d] become full-vocabulary logits [n, V] (the
# PersRM's head, the guide's own lm_head), and which lane it reads
LaneLogits = Callable[[torch.Tensor], torch.Tensor]
Reader = tuple[int, LaneLogits]
Segments = Sequence[Sequence[tuple[int, ...]]]  # per request, per candidate: guide ids


@dataclass
class TextGuideOutput(StreamOutput):
    """A text guide's last-position outputs, with the stream that scores candidates after
    them (a strategy sees outputs, not streams)."""

    stream: TextGuideStream | None = None

    def candidate_log_probs(self, segments: Segments, readers: Sequence[Reader],
                            first_token_only: bool = False) -> torch.Tensor:
        """``[requests, readers, k]``: each candidate's guide log-probability as each reader
        (a lane and its logits) sees it. ``first_token_only``: PAD's released mapping, each
        candidate scored by the first guide token of its text alone (candidates sharing it
        score alike), for comparison."""
        first = torch.stack([_first_tokens(log_probs(logits_of, self.hidden[:, lane]),
                                           segments, self.stream.end_ids)
                             for lane, logits_of in readers], dim=1)
        if first_token_only or all(len(s) < 2 for row in segments for s in row):
            return first
        return first + self.stream.extension(segments, readers)


def log_probs(logits_of: LaneLogits, hidden: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return logits_of(hidden).float().log_softmax(-1)


def _first_tokens(log_probs_: torch.Tensor, segments: Segments, end_ids: torch.Tensor
                  ) -> torch.Tensor:
    """``[requests, k]``: ``log p(g1 | ctx)``; an end of turn is any of the guide's end ids."""
    first = torch.tensor([[segment[0] for segment in row] for row in segments],
                         device=log_probs_.device)
    scores = log_probs_.gather(1, first.clamp(min=0))
    ends = first == END[0]
    if ends.any():
        end = log_probs_[:, end_ids].logsumexp(-1, keepdim=True).expand_as(scores)
        scores = torch.where(ends, end, scores)
    return scores


class TextGuideStream(KVStream):
    """A guide's KV stream whose rows advance by the guide tokens of each chosen base token
    (one or more), not by the base's id."""

    def __init__(self, model, transducer: Transducer, end_ids: Sequence[int],
                 lanes: int = 1) -> None:
        super().__init__(model, lanes, logits=False)
        self.transducer = transducer
        self.end_ids = torch.tensor(sorted(set(end_ids)), device=self.device)

    def _forward(self, input_ids, mask, positions, cache) -> TextGuideOutput:
        out = super()._forward(input_ids, mask, positions, cache)
        return TextGuideOutput(out.logits, out.hidden, self)

    def step(self, tokens: torch.Tensor) -> TextGuideOutput:
        """Append each request's base token as its guide tokens: ragged, right-aligned in one
        block with the gaps masked, so every row's last column is its newest token. An end
        of sequence the base decodes through (``ignore_eos``) is read as the guide's end of
        turn."""
        segments = [(int(self.end_ids[0]),) if segment == END else segment
                    for segment in self.transducer.segments(tokens.tolist())]
        width = max(map(len, segments))
        rows = [segment for segment in segments for _ in range(self.lanes)]
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        new_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, segment in enumerate(rows):
            ids[row, width - len(segment):] = torch.tensor(segment)
            new_mask[row, width - len(segment):] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        # a gap's position is never read (masked); real columns continue each row's count
        positions = self.next_position[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self._forward(ids, self.mask, positions, self.cache)
        self.next_position = self.next_position + new_mask.sum(-1)
        return out

    def extension(self, segments: Segments, readers: Sequence[Reader]) -> torch.Tensor:
        """``[requests, readers, k]``: ``sum_{j>=2} log p(gj | ctx, g<j)`` for every
        candidate of two or more guide tokens, 0 for the others."""
        requests, k = len(segments), len(segments[0])
        # each request's columns: (candidate, index in it, token) for g1 .. g(m-1)
        trees = [[(i, j, token) for i, segment in enumerate(row) if len(segment) > 1
                  for j, token in enumerate(segment[:-1])] for row in segments]
        hidden = self._extension_hidden(trees)
        extra = torch.zeros(requests, len(readers), k, device=self.device)
        for reader, (lane, logits_of) in enumerate(readers):
            lane_hidden = hidden[lane::self.lanes]
            scores = log_probs(logits_of, lane_hidden.reshape(-1, lane_hidden.shape[-1])
                               ).view(requests, lane_hidden.shape[1], -1)
            for r, tree in enumerate(trees):
                for column, (i, j, _) in enumerate(tree):
                    extra[r, reader, i] += scores[r, column, segments[r][i][j + 1]]
        return extra

    def _extension_hidden(self, trees: Sequence[Sequence[tuple[int, int, int]]]
                          ) -> torch.Tensor:
        """One forward of every request's tree columns after its cache (every lane alike),
        each column seeing the cache and its own candidate's earlier columns; the cache is
        cut back to what it was. ``[rows, width, d]``."""
        width = max(len(tree) for tree in trees)
        past = self.mask.shape[1]
        rows = len(trees) * self.lanes
        ids = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        allowed = torch.zeros(rows, width, past + width, dtype=torch.bool)
        allowed[:, :, :past] = self.mask.bool().cpu()[:, None, :]
        starts = self.next_position.cpu()
        for r, tree in enumerate(trees):
            for row in range(r * self.lanes, (r + 1) * self.lanes):
                for column, (i, j, token) in enumerate(tree):
                    ids[row, column] = token
                    positions[row, column] = starts[row] + j
                    for seen, (other, at, _) in enumerate(tree):
                        allowed[row, column, past + seen] = other == i and at <= j
                for column in range(len(tree), width):  # padding sees itself only
                    allowed[row, column, past + column] = True
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
        with torch.inference_mode():
            hidden = self._decoder(input_ids=ids.to(self.device),
                                   attention_mask=mask.to(self.device),
                                   position_ids=positions.to(self.device),
                                   past_key_values=self.cache, use_cache=True
                                   ).last_hidden_state
        self.cache.crop(-width)  # drop the tree columns again
        return hidden
