"""``padlm train experts``: one expert per dimension, trained on that dimension's pairs only.

``head``: the PersRM head trainer (DPO on cached hidden states, :func:`padlm.training.
pipeline.run_training`) once per dimension with ``dimensions=(dim,)``; chosen = the response
written for the dimension, rejected = the one written for its opposite. The reference is the
preference-conditioned base (``conditioned``), so each expert is its prompted expert plus a
head. ``lora``: PAD's LoRA DPO stage once per dimension (GPU work at real scale).

Each finished dimension is kept in ``<out>.work/<dim>/`` (and the head trainer checkpoints
per epoch), so an interrupted run redoes only what it had not finished.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from padlm.core.models import LoadedModel
from padlm.core.persrm import ADAPTER_NAME, PersonalizedRewardModel
from padlm.orchestration.experts import (
    LORA_TARGETS,
    Experts,
    ExpertsConfig,
    lora_backbone,
    lora_state,
)
from padlm.training.configs import TrainConfig
from padlm.training.pipeline import file_sha256, run_training

log = logging.getLogger(__name__)


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def train_head_experts(lm: LoadedModel, base: TrainConfig, dimensions: Sequence[str],
                       context: str = "dimension") -> Experts:
    """Head experts saved to ``base.out``; ``base`` carries the data and the head recipe
    (its ``dimensions`` and ``out`` are set per expert)."""
    work = work_dir(base.out)
    work.mkdir(parents=True, exist_ok=True)  # the head trainer checkpoints beside its output
    heads, per_dimension = {}, {}
    for dimension in dimensions:
        target = work / dimension
        if (target / "config.json").exists():
            persrm = PersonalizedRewardModel.load(target)
            log.info("%s: already trained in %s", dimension, target)
        else:
            persrm = run_training(lm, replace(base, out=target, dimensions=(dimension,)))
        heads[dimension] = persrm.head.to(lm.device)
        training = persrm.config.training
        per_dimension[dimension] = {key: training[key] for key in (
            "counts", "validation", "history", "head_training_seconds")}
    config = ExpertsConfig("head", list(dimensions), lm.name, lm.model.config.hidden_size,
                           base.placement, training={
                               "data": str(base.data), "data_sha256": file_sha256(base.data),
                               "head": asdict(base.head), "label_filter": base.label_filter,
                               "per_dimension": per_dimension, "command": base.command},
                           context=context)
    experts = Experts(config, lm, heads)
    experts.save(base.out)
    shutil.rmtree(work, ignore_errors=True)
    return experts


def train_lora_experts(lm: LoadedModel, base: TrainConfig, dimensions: Sequence[str],
                       context: str = "dimension") -> Experts:
    """LoRA experts: PAD's LoRA DPO stage per dimension, all adapters on one backbone."""
    from padlm.training.lora import train_lora

    states, info = {}, {}
    for dimension in dimensions:
        backbone, info[dimension] = train_lora(lm, replace(base, dimensions=(dimension,)))
        states[dimension] = lora_state(backbone, ADAPTER_NAME)
    lora = {"rank": base.lora_rank, "alpha": 2 * base.lora_rank,  # what train_lora uses
            "targets": list(LORA_TARGETS)}
    config = ExpertsConfig("lora", list(dimensions), lm.name, lm.model.config.hidden_size,
                           base.placement, lora=lora, training={
                               "data": str(base.data), "data_sha256": file_sha256(base.data),
                               "per_dimension": info, "command": base.command},
                           context=context)
    experts = Experts(config, lm, backbone=lora_backbone(lm, states, lora))
    experts.save(base.out)
    return experts
