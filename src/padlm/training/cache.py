"""Final hidden states of chosen / rejected responses, computed once and cached on disk.

For each sequence ``(x, p, y)`` the cache keeps, at every response position ``t`` (the state
that predicts ``y_t``; the end-of-turn token is the last target, so a head learns when to
stop, unless the response was cut at ``MAX_RESPONSE_TOKENS``: a cut answer did not end there,
and an end-of-turn target after it would teach a head to stop mid-sentence): the final normed
hidden state ``h_t`` (fp16), the target ``y_t``, the base model's
top-k candidates at ``t`` (what decoding re-ranks) and the base log-prob of ``y_t`` over the
full vocabulary (for the untrained baseline and the self-consistency filter).

The cache is content-addressed by row: each row is keyed by what shapes its states (prompt,
preference, chosen, rejected), and every shard's header lists the keys it holds. Shards of up
to ``SHARD_ROWS`` rows are written atomically as they finish, so an interrupted run computes
only the rows no shard holds; a dataset that grew, was reordered or had rows edited recomputes
only its new or edited rows. The cache directory is keyed by the backbone's weights, the
placement and k.
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from padlm.atomic import write_json_atomic
from padlm.core.kvstream import shared_context_hidden
from padlm.core.models import LoadedModel, padlm_home
from padlm.core.prompting import render
from padlm.data.schema import PreferenceRow
from padlm.errors import PadlmError

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
    """Context ids (chat template, preference placed) and response ids: ending in end-of-turn
    when the whole response fits, cut without one when it does not."""
    context = render(tokenizer, prompt, preference, placement)[-MAX_CONTEXT_TOKENS:]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(ids) > MAX_RESPONSE_TOKENS:
        return context, ids[:MAX_RESPONSE_TOKENS]
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
            for states in shared_context_hidden(model, contexts, responses)]


@torch.no_grad()
def response_states(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]], top_k: int) -> list[SequenceStates]:
    """The states at the response positions (each distinct context prefilled once),
    computed on the model's device and returned on the CPU, where the cache keeps them."""
    lm_head = model.get_output_embeddings().weight
    results = []
    for states, response in zip(shared_context_hidden(model, contexts, responses), responses,
                                strict=True):
        logits = (states @ lm_head.T).float()
        targets = torch.tensor(response, dtype=torch.long, device=logits.device)
        log_probs = logits.log_softmax(-1)
        results.append(SequenceStates(
            hidden=states.to(torch.float16).cpu(), targets=targets.cpu(),
            candidates=logits.topk(top_k, dim=-1).indices.cpu(),
            base_logp=log_probs.gather(1, targets[:, None])[:, 0].cpu(),
        ))
    return results


def row_key(row: PreferenceRow) -> str:
    """What a row's cached states depend on (the directory key covers model, placement, k);
    a changed dimension, source or meta reuses them."""
    content = json.dumps([row.prompt, row.preference, row.chosen, row.rejected])
    return hashlib.sha256(content.encode()).hexdigest()[:24]


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
            "version": 3})

    def _set_key(self, root: Path, key: dict) -> None:
        """A cache lives in a directory named by everything that shapes its contents."""
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = root / name
        self.key = key

    def _index(self) -> dict[str, tuple[Path, int]]:
        """Row key -> (shard, row within it), read from the shards' headers only."""
        index: dict[str, tuple[Path, int]] = {}
        for path in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(str(path), "pt") as shard:
                keys = json.loads(shard.metadata()["rows"])
            for position, key in enumerate(keys):
                index.setdefault(key, (path, position))
        return index

    def missing(self) -> list[int]:
        """Indexes (into ``rows``) of the rows no shard holds yet, one per distinct key."""
        cached, seen, todo = self._index(), set(), []
        for i, key in enumerate(map(row_key, self.rows)):
            if key not in cached and key not in seen:
                seen.add(key)
                todo.append(i)
        return todo

    def build(self, batch_size: int = 8,
              progress: Callable[[int], None] | None = None) -> int:
        """Compute every missing row; returns how many were computed (0 = fully cached).
        ``batch_size`` counts sequences; an even one keeps each row's two in one batch."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.directory / "key.json", self.key)
        todo = self.missing()
        for start in range(0, len(todo), SHARD_ROWS):
            indexes = todo[start:start + SHARD_ROWS]
            # sequence 2i is row i's chosen response, 2i + 1 its rejected one
            sequences = [2 * i + side for i in indexes for side in (0, 1)]
            encoded = [self._encode(self.rows[s // 2], s % 2) for s in sequences]
            # by length, a row's two sequences side by side (batches hold whole rows, so
            # chosen and rejected share their context's prefill)
            pair_length = [max(sum(map(len, encoded[j])), sum(map(len, encoded[j ^ 1])))
                           for j in range(len(encoded))]
            order = sorted(range(len(encoded)), key=lambda j: (pair_length[j], j))
            outputs: list = [None] * len(encoded)
            for begin in range(0, len(order), batch_size):
                chunk = order[begin:begin + batch_size]
                outs = self._compute([sequences[j] for j in chunk],
                                     [encoded[j][0] for j in chunk],
                                     [encoded[j][1] for j in chunk])
                for j, out in zip(chunk, outs, strict=True):
                    outputs[j] = out
            self._write([row_key(self.rows[i]) for i in indexes], self._tensors(outputs))
            if progress is not None:
                progress(len(indexes))
        return len(todo)

    def _encode(self, row: PreferenceRow, side: int) -> tuple[list[int], list[int]]:
        """Context and response ids of a row's chosen (side 0) or rejected (1) response."""
        return encode_sequence(self.lm.tokenizer, row.prompt, self._preference(row),
                               (row.chosen, row.rejected)[side], self.placement)

    def _preference(self, row: PreferenceRow) -> str:
        return row.preference

    def _compute(self, sequences: list[int], contexts, responses) -> list:
        """Per-sequence results of one batch (``sequences``: 2 * row index + 0 for chosen,
        1 for rejected); the seam :class:`ReferenceCache` overrides, so both caches share
        one resumable loop."""
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

    def _write(self, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Atomically, named by its rows: a shard is complete or absent."""
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        path = self.directory / f"shard-{name}.safetensors"
        staging = path.with_suffix(".tmp")
        save_file(tensors, str(staging), metadata={"rows": json.dumps(keys)})
        os.replace(staging, path)

    def load(self) -> list[tuple[SequenceStates, SequenceStates]]:
        """``(chosen, rejected)`` states for every row, in row order."""
        seqs = [SequenceStates(*fields) for fields in self._sequences(
            ("hidden", "targets", "candidates", "base_logp"))]
        return list(zip(seqs[0::2], seqs[1::2], strict=True))

    def _sequences(self, names: Sequence[str]) -> Iterator[tuple[torch.Tensor, ...]]:
        """Each row's chosen then rejected slices of the named tensors, in row order."""
        index = self._index()
        loaded: dict[Path, tuple[dict[str, torch.Tensor], list[int]]] = {}
        for row in self.rows:
            key = row_key(row)
            if key not in index:
                raise PadlmError(f"the cache at {self.directory} lacks a row; build it first")
            path, position = index[key]
            if path not in loaded:
                data = load_file(str(path))
                loaded[path] = data, [0, *data["lengths"].cumsum(0).tolist()]
            data, bounds = loaded[path]
            for sequence in (2 * position, 2 * position + 1):
                a, b = bounds[sequence], bounds[sequence + 1]
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

    def _compute(self, sequences: list[int], contexts, responses) -> list:
        out = []
        for i, logits in zip(sequences, response_logits(self.backbone, contexts, responses),
                             strict=True):
            primary = self.states[i]  # cached on the CPU; the logits are on the device
            ids = torch.cat([primary.candidates, primary.targets[:, None]], dim=1
                            ).to(logits.device)
            out.append((logits.gather(1, ids).cpu(),
                        logits.log_softmax(-1).gather(1, ids[:, -1:])[:, 0].cpu()))
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
