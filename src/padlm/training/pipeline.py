"""``padlm train persrm``: data -> split -> (LoRA stage) -> hidden-state cache -> head -> PersRM.

Everything a run depends on lands in the output's ``config.json`` (``training``): the base
model and the sha256 of its weights, the stage, the head recipe, the dimensions, the data
file's sha256, per-epoch metrics, the untrained baseline, the training time and the exact
command. The output is written atomically; a per-epoch checkpoint next to it lets an
interrupted run resume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from padlm.core.models import LoadedModel
from padlm.core.persrm import (
    PersonalizedRewardModel,
    PersRMConfig,
    ValueHead,
)
from padlm.data.schema import PreferenceRow, load_rows
from padlm.data.splits import split_rows
from padlm.errors import PadlmError
from padlm.training.cache import (
    HiddenStateCache,
    ReferenceCache,
    SequenceStates,
    weights_sha256,
)
from padlm.training.configs import HeadTrainingConfig, TrainConfig
from padlm.training.head import (
    baseline_report,
    end_of_turn_report,
    evaluate,
    train_head,
)

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dedupe(rows: Sequence[PreferenceRow]) -> list[PreferenceRow]:
    """Drop repeated rows (same key, or same content): a resumed build may repeat a chunk."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = repr(row.meta.get("key")) if row.meta.get("key") else row.to_json()
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def consistency_scores(rows: Sequence[PreferenceRow],
                       states: Sequence[tuple[SequenceStates, SequenceStates]],
                       ) -> list[float | None]:
    """Self-consistency of each contrastive pair under the base model's own likelihoods.

    For ``(x, p_A): y_A > y_B`` with mirror ``(x, p_B): y_B > y_A`` the score is
    ``[log p(y_A|p_A) - log p(y_B|p_A)] + [log p(y_B|p_B) - log p(y_A|p_B)]``: positive when
    ``y_A`` is likelier under ``p_A`` than under ``p_B`` relative to ``y_B``. Rows without a
    mirror (human pairs) get None (never filtered).
    """
    margin = {}
    for row, (chosen, rejected) in zip(rows, states, strict=True):
        key = row.meta.get("key")
        if key:
            margin[tuple(key)] = float(chosen.base_logp.sum() - rejected.base_logp.sum())
    scores = []
    for row in rows:
        key, mirror = row.meta.get("key"), row.meta.get("mirror")
        if key and mirror and tuple(mirror) in margin:
            scores.append(margin[tuple(key)] + margin[tuple(mirror)])
        else:
            scores.append(None)
    return scores


@dataclass
class PreparedData:
    train_rows: list[PreferenceRow]
    train_states: list
    val_rows: list[PreferenceRow]
    val_states: list
    val_clean: list[bool]  # passes the label filter (reported separately)
    counts: dict


def prepare(lm: LoadedModel, config: TrainConfig, backbone=None, model_sha: str = "",
            ) -> PreparedData:
    """Load, split by prompt, cache hidden states, apply the label filter."""
    rows, errors = load_rows(config.data, strict=config.strict)
    rows = dedupe(rows)
    if config.dimensions:
        rows = [r for r in rows if r.dimension in config.dimensions]
        if not rows:
            raise PadlmError(f"no rows for dimensions {', '.join(config.dimensions)}")
    cache = HiddenStateCache(config.cache_dir, lm, rows, config.placement, config.top_k,
                             model_sha, backbone=backbone)
    _fill(cache, "caching hidden states")
    states = cache.load()
    if config.head.reference == "unconditioned":
        reference = ReferenceCache(cache, states)
        _fill(reference, "caching the preference-free reference")
        reference.attach()
    scores = consistency_scores(rows, states)
    clean = [s is None or s > 0 for s in scores]
    train_idx, val_idx = [], []
    train_rows, val_rows = split_rows(rows, config.validation_fraction, config.fold)
    val_ids = {id(r) for r in val_rows}
    for i, row in enumerate(rows):
        # a held-out axis (the unseen-preference test) is never trained on, whatever its
        # prompt's split: all of its pairs validate
        held_out = bool((row.meta or {}).get("held_out"))
        (val_idx if id(row) in val_ids or held_out else train_idx).append(i)
    holdout = set(config.holdout_dimensions)
    train_idx = [i for i in train_idx if rows[i].dimension not in holdout]
    dropped = 0
    if config.label_filter == "consistency":
        kept = [i for i in train_idx if clean[i]]
        dropped = len(train_idx) - len(kept)
        train_idx = kept
    if config.max_train_pairs is not None:
        train_idx = train_idx[:config.max_train_pairs]
    if not train_idx:
        raise PadlmError("no training pairs left after the split, holdout and filter")
    counts = {"rows": len(rows), "bad_rows": len(errors), "train_pairs": len(train_idx),
              "validation_pairs": len(val_idx), "filtered_out_train": dropped,
              "validation_clean_pairs": sum(clean[i] for i in val_idx),
              "train_per_dimension": _count(rows[i].dimension for i in train_idx),
              "validation_per_dimension": _count(rows[i].dimension for i in val_idx)}
    return PreparedData([rows[i] for i in train_idx], [states[i] for i in train_idx],
                        [rows[i] for i in val_idx], [states[i] for i in val_idx],
                        [clean[i] for i in val_idx], counts)


def _fill(cache: HiddenStateCache, description: str) -> None:
    """Compute a cache's missing rows with a progress bar (a no-op when complete)."""
    missing = len(cache.missing())
    if not missing:
        return
    from tqdm import tqdm

    began = time.perf_counter()
    rows = len(cache.rows)
    with tqdm(total=missing, desc=description, mininterval=10) as bar:
        cache.build(progress=bar.update)
    log.info("%s: %d of %d rows in %.0f s at %s", description, missing, rows,
             time.perf_counter() - began, cache.directory)


def _count(items) -> dict:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return dict(sorted(counts.items()))


def validation_reports(head, data: PreparedData, lm_head: torch.Tensor,
                       config: HeadTrainingConfig, end_token: int) -> dict:
    """Accuracy on all validation pairs and on the clean ones: the trained head, the same
    head untrained (``W = I``: 0.5 with a conditioned reference, the preference's PMI with an
    unconditioned one) and the mean-log-prob baseline; and, trained vs untrained, the
    log-prob of end-of-turn where validation responses end (does the head still stop?)."""
    reports: dict = {"end_of_turn": {
        name: end_of_turn_report(candidate, data.val_states, lm_head, config.vocab, end_token)
        for name, candidate in (("head", head), ("untrained_head", None))}}
    for name, keep in (("all", [True] * len(data.val_rows)), ("clean", data.val_clean)):
        pairs = [s for s, k in zip(data.val_states, keep, strict=True) if k]
        dims = [r.dimension for r, k in zip(data.val_rows, keep, strict=True) if k]
        if pairs:
            reports[name] = {
                "head": evaluate(head, pairs, dims, lm_head, config.vocab, config.reference),
                "untrained_head": evaluate(None, pairs, dims, lm_head, config.vocab,
                                           config.reference),
                "baseline_mean_logprob": baseline_report(pairs, dims)}
    return reports


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint.pt")


def run_training(lm: LoadedModel, config: TrainConfig) -> PersonalizedRewardModel:
    """Train and save a PersRM; returns it."""
    began = time.perf_counter()
    model_sha = weights_sha256(lm.model)
    backbone = None
    lora_info: dict = {}
    if config.stage in ("lora", "both"):
        from padlm.training.lora import train_lora

        backbone, lora_info = train_lora(lm, config)
    data = prepare(lm, config, backbone=backbone,
                   model_sha=model_sha + lora_info.get("adapter_sha256", ""))
    log.info("data: %s", data.counts)
    lm_head = lm.model.get_output_embeddings().weight.detach().float()
    val_pairs = data.val_states
    val_dims = [r.dimension for r in data.val_rows]
    ckpt = checkpoint_path(config.out)
    signature = {"head": asdict(config.head), "data": file_sha256(config.data),
                 "model": model_sha, "holdout": list(config.holdout_dimensions),
                 "filter": config.label_filter, "max": config.max_train_pairs}
    state = None
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if saved.get("signature") == signature:
            state = saved
            log.info("resuming from %s after epoch %d", ckpt, len(saved["history"]))

    def on_epoch(record, head, optimizer) -> None:
        acc = record.get("validation", {}).get("accuracy_mean_over_dimensions")
        log.info("epoch %d: loss %.4f, validation accuracy %s, %.1f s", record["epoch"],
                 record["loss"], acc, record["seconds"])
        staging = ckpt.with_suffix(".tmp")
        torch.save({"signature": signature, "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(), "history": history_so_far(record)},
                   staging)
        os.replace(staging, ckpt)

    history_acc: list[dict] = list(state["history"]) if state else []

    def history_so_far(record) -> list[dict]:
        history_acc.append(record)
        return history_acc

    train_began = time.perf_counter()
    head, history = train_head(data.train_states, lm_head, config.head, val_pairs, val_dims,
                               state=state, on_epoch=on_epoch,
                               dimensions=[r.dimension for r in data.train_rows])
    train_seconds = time.perf_counter() - train_began
    reports = validation_reports(head, data, lm_head, config.head, lm.tokenizer.eos_token_id)
    value_head = ValueHead(lm_head.shape[1])
    with torch.no_grad():
        value_head.weight.copy_(head.weight())
        value_head.bias.copy_(head.bias)
    training = {
        "stage": config.stage, "base_model": lm.name, "base_model_sha256": model_sha,
        # the cache's states come from the backbone in this dtype (its sha256 covers it too)
        "base_model_dtype": lm.dtype_name,
        "head": asdict(config.head), "dimensions": sorted({r.dimension for r in
                                                           data.train_rows}),
        "holdout_dimensions": list(config.holdout_dimensions),
        "label_filter": config.label_filter, "data": str(config.data),
        "data_sha256": file_sha256(config.data), "counts": data.counts,
        "history": history, "validation": reports,
        "head_training_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - began, 1),
        "command": config.command or " ".join(sys.argv), **lora_info,
    }
    persrm_config = PersRMConfig(
        base_model=lm.name, hidden_size=lm_head.shape[1],
        recommended_weight=config.recommended_weight, top_k=config.top_k,
        placement=config.placement, lora=backbone is not None, base_model_sha256=model_sha,
        reference=config.head.reference,
        training=training,
    )
    persrm = PersonalizedRewardModel(persrm_config, value_head, backbone)
    persrm.save(config.out)
    persrm.path = str(config.out)
    ckpt.unlink(missing_ok=True)
    return persrm
