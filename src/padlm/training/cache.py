"""Final hidden states of chosen / rejected responses, computed once and cached on disk.

For each sequence ``(x, p, y)`` the cache keeps, at every response position ``t`` (the state
that predicts ``y_t``; the end-of-turn token is the last target, so a head learns when to
stop): the final normed hidden state ``h_t`` (fp16), the target ``y_t``, the base model's
top-k candidates at ``t`` (what decoding re-ranks) and the base log-prob of ``y_t`` over the
full vocabulary (for the untrained baseline and the self-consistency filter).

Shards of ``SHARD_ROWS`` rows are written atomically as they finish, so an interrupted run
picks up at the first missing shard. The cache directory is keyed by the backbone's weights,
the placement and k, and each shard's file name by its rows' content, so a stale shard is
never reused while a dataset that grew keeps its finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from padlm.atomic import write_json_atomic
from padlm.data.schema import PreferenceRow
from padlm.kvstream import response_hidden
from padlm.models import LoadedModel, padlm_home
from padlm.prompting import render

log = logging.getLogger(__name__)

SHARD_ROWS = 64
MAX_RESPONSE_TOKENS = 96
MAX_CONTEXT_TOKENS = 448


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes (stable for the same weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encode_sequence(tokenizer, prompt, preference: str, response: str, placement: str,
                    ) -> tuple[list[int], list[int]]:
    """Context ids (chat template, preference placed) and response ids ending in end-of-turn."""
    context = render(tokenizer, prompt, preference, placement)[-MAX_CONTEXT_TOKENS:]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"][:MAX_RESPONSE_TOKENS]
    return context, [*ids, tokenizer.eos_token_id]


@dataclass
class SequenceStates:
    """One response's cached per-position data (see the module docstring)."""

    hidden: torch.Tensor  # [T, d] float16
    targets: torch.Tensor  # [T] int64
    candidates: torch.Tensor  # [T, k] int64, the base model's top-k at each position
    base_logp: torch.Tensor  # [T] float32, full-vocabulary log p_base(y_t)
    # set by :meth:`ReferenceCache.attach` for a PersRM whose reference is the preference-free base
    reference_k: torch.Tensor | None = None  # [T, k + 1] its logits at candidates + target
    reference_logp: torch.Tensor | None = None  # [T] its full-vocabulary log p(y_t)


@torch.no_grad()
def response_logits(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Full-vocabulary float32 logits ``[T, V]`` at each response's positions."""
    lm_head = model.get_output_embeddings().weight
    return [(states @ lm_head.T).float()
            for states in response_hidden(model, contexts, responses)]


@torch.no_grad()
def response_states(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]], top_k: int) -> list[SequenceStates]:
    """One batched forward; returns the states at the response positions."""
    lm_head = model.get_output_embeddings().weight
    results = []
    for states, response in zip(response_hidden(model, contexts, responses), responses,
                                strict=True):
        logits = (states @ lm_head.T).float()
        targets = torch.tensor(response, dtype=torch.long)
        log_probs = logits.log_softmax(-1)
        results.append(SequenceStates(
            hidden=states.to(torch.float16), targets=targets,
            candidates=logits.topk(top_k, dim=-1).indices,
            base_logp=log_probs.gather(1, targets[:, None])[:, 0],
        ))
    return results


def rows_fingerprint(rows: Sequence[PreferenceRow]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.to_json().encode())
    return digest.hexdigest()


class HiddenStateCache:
    """Sharded, resumable on-disk cache for one (backbone, placement, k, rows) combination."""

    def __init__(self, root: Path | None, lm: LoadedModel, rows: Sequence[PreferenceRow],
                 placement: str, top_k: int, model_sha256: str, backbone=None) -> None:
        self.lm = lm
        self.backbone = backbone if backbone is not None else lm.model
        self.rows = list(rows)
        self.placement = placement
        self.top_k = top_k
        self._set_key(root or padlm_home() / "persrm-cache", {
            "model_sha256": model_sha256, "placement": placement, "top_k": top_k,
            "max_response": MAX_RESPONSE_TOKENS, "max_context": MAX_CONTEXT_TOKENS,
            "version": 1})

    def _set_key(self, root: Path, key: dict) -> None:
        """A cache lives in a directory named by everything that shapes its contents."""
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = root / name
        self.key = key

    @property
    def shards(self) -> int:
        return (len(self.rows) + SHARD_ROWS - 1) // SHARD_ROWS

    def _path(self, shard: int) -> Path:
        """Shards are named by their rows' content: a grown dataset reuses its old shards."""
        rows = self._shard_rows(shard)
        return self.directory / f"shard-{shard:05d}-{rows_fingerprint(rows)[:16]}.safetensors"

    def missing(self) -> list[int]:
        return [s for s in range(self.shards) if not self._path(s).exists()]

    def _shard_rows(self, shard: int) -> list[PreferenceRow]:
        return self.rows[shard * SHARD_ROWS:(shard + 1) * SHARD_ROWS]

    def build(self, batch_size: int = 8,
              progress: Callable[[int], None] | None = None) -> int:
        """Compute every missing shard; returns how many were computed (0 = fully cached)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.directory / "key.json", self.key)
        todo = self.missing()
        for shard in todo:
            rows = self._shard_rows(shard)
            encoded = [encode_sequence(self.lm.tokenizer, row.prompt, self._preference(row),
                                       response, self.placement)
                       for row in rows for response in (row.chosen, row.rejected)]
            order = sorted(range(len(encoded)), key=lambda i: sum(map(len, encoded[i])))
            outputs: list = [None] * len(encoded)
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                outs = self._compute(shard, chunk, [encoded[i][0] for i in chunk],
                                     [encoded[i][1] for i in chunk])
                for i, out in zip(chunk, outs, strict=True):
                    outputs[i] = out
            self._write(shard, self._tensors(outputs))
            if progress is not None:
                progress(len(rows))
        return len(todo)

    def _preference(self, row: PreferenceRow) -> str:
        return row.preference

    def _compute(self, shard: int, sequences: list[int], contexts, responses) -> list:
        """Per-sequence results of one batch (``sequences``: their indexes in the shard); the
        seam :class:`ReferenceCache` overrides, so both caches share one resumable loop."""
        return response_states(self.backbone, contexts, responses, self.top_k)

    @staticmethod
    def _tensors(states: list[SequenceStates]) -> dict[str, torch.Tensor]:
        return {
            "hidden": torch.cat([s.hidden for s in states]).contiguous(),
            "targets": torch.cat([s.targets for s in states]),
            "candidates": torch.cat([s.candidates for s in states]).contiguous(),
            "base_logp": torch.cat([s.base_logp for s in states]),
            "lengths": torch.tensor([len(s.targets) for s in states], dtype=torch.long),
        }

    def _write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(shard)
        staging = path.with_suffix(".tmp")
        save_file(tensors, str(staging))
        os.replace(staging, path)

    def load(self) -> list[tuple[SequenceStates, SequenceStates]]:
        """``(chosen, rejected)`` states for every row, in row order."""
        seqs = [SequenceStates(*fields) for fields in self._sequences(
            ("hidden", "targets", "candidates", "base_logp"))]
        return list(zip(seqs[0::2], seqs[1::2], strict=True))

    def _sequences(self, names: Sequence[str]) -> Iterator[tuple[torch.Tensor, ...]]:
        """Each cached sequence's slices of the named tensors, shard by shard, in row order."""
        for shard in range(self.shards):
            data = load_file(str(self._path(shard)))
            bounds = [0, *data["lengths"].cumsum(0).tolist()]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                yield tuple(data[name][a:b] for name in names)


class ReferenceCache(HiddenStateCache):
    """The preference-free base model's view of the same responses, for a PersRM whose DPO
    reference is the base model WITHOUT the preference (``reference="unconditioned"``).

    Per position it keeps that model's logits at the primary cache's candidates plus the
    target (what the candidate-restricted log-softmax needs) and its full-vocabulary log-prob
    of the target; no hidden states, so it is a small fraction of the primary cache. It is
    built from, and attaches to, the primary cache's loaded ``(chosen, rejected)`` states.
    """

    def __init__(self, primary: HiddenStateCache,
                 states: Sequence[tuple[SequenceStates, SequenceStates]]) -> None:
        super().__init__(primary.directory.parent, primary.lm, primary.rows, primary.placement,
                         primary.top_k, primary.key["model_sha256"], primary.backbone)
        self._set_key(primary.directory.parent, {**primary.key, "reference": "no-preference"})
        self.states = [state for pair in states for state in pair]  # sequence order

    def _preference(self, row: PreferenceRow) -> str:
        return ""

    def _compute(self, shard: int, sequences: list[int], contexts, responses) -> list:
        out = []
        for i, logits in zip(sequences, response_logits(self.backbone, contexts, responses),
                             strict=True):
            primary = self.states[2 * SHARD_ROWS * shard + i]
            ids = torch.cat([primary.candidates, primary.targets[:, None]], dim=1)
            out.append((logits.gather(1, ids),
                        logits.log_softmax(-1).gather(1, primary.targets[:, None])[:, 0]))
        return out

    @staticmethod
    def _tensors(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"reference_k": torch.cat([k for k, _ in outputs]).contiguous(),
                "reference_logp": torch.cat([lp for _, lp in outputs]),
                "lengths": torch.tensor([len(lp) for _, lp in outputs], dtype=torch.long)}

    def attach(self) -> None:
        """Fill ``reference_k`` / ``reference_logp`` of the primary states it was given."""
        for state, (logits_k, logp) in zip(
                self.states, self._sequences(("reference_k", "reference_logp")), strict=True):
            state.reference_k, state.reference_logp = logits_k, logp
