"""The shipped PersRM's headline validation accuracy, recomputed from its data and its head
rather than read back from the record its trainer wrote."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from padlm.core.guides import default_persrm_dir
from padlm.core.models import load_model
from padlm.core.persrm import PersonalizedRewardModel
from padlm.data.schema import load_rows
from padlm.data.splits import split_rows
from padlm.training.cache import weights_sha256
from padlm.training.configs import HeadTrainingConfig, TrainConfig
from padlm.training.pipeline import dedupe, prepare, validation_reports

ROOT = Path(__file__).resolve().parents[1]
# One dimension's validation pairs, all of them (the record has per-dimension accuracies, so
# the recomputation is compared with a recorded number, not a sample of one): P3B, the axis
# where the trained head and the untrained one differ most (29 vs 22 of 34 pairs recorded),
# so a test that scored with the wrong head, or none, could not pass.
DIMENSION = "P3B"


@pytest.mark.slow
def test_the_shipped_persrms_validation_accuracy_recomputes_from_data_and_head(
        default_lm, tmp_path):
    """The trainer's own path, run again on the recorded inputs: the committed data file
    (sha256 as recorded), split by prompt (``split_rows``), one dimension's validation pairs
    through ``prepare`` (hidden states and the preference-free reference computed afresh
    into an empty cache, from the same base weights: sha256 as recorded) and
    ``validation_reports`` (the accuracy function the trainer reported with). The one
    difference: it scores with the SHIPPED head (the exported ``W = I + U V^T``, ``b``)
    where the trainer scored the head it had just trained, so this also checks that what
    ships is what was measured.

    Tolerance: none, exact per-dimension accuracy. The same code on the same weights and
    data can differ only in floating point (batch composition, the exported W against the
    factorised one), while the smallest |chosen - rejected reward margin| among these pairs
    is 0.26 for the trained head and 0.16 for the untrained one (measured), orders of
    magnitude above float32 noise: no pair can flip, so any difference is a real one.
    """
    persrm = PersonalizedRewardModel.load(default_persrm_dir("default"))
    training = persrm.config.training
    recorded = training["validation"]["all"]
    lm = default_lm
    if lm.device.type != "cpu" or lm.model.dtype != torch.float32:
        # as it was trained: the recorded sha256 is of the float32 weights
        lm = load_model("default", "float32", torch.device("cpu"))
    model_sha = weights_sha256(lm.model)
    assert model_sha == training["base_model_sha256"]
    data = ROOT / training["data"]
    assert hashlib.sha256(data.read_bytes()).hexdigest() == training["data_sha256"]

    rows, errors = load_rows(data)
    assert not errors
    train, validation = split_rows(dedupe(rows))
    picked = [row for row in validation if row.dimension == DIMENSION]
    assert len(picked) == recorded["head"]["per_dimension"][DIMENSION]["pairs"] == 34
    subset = tmp_path / "pairs.jsonl"  # prepare() needs one training pair to run at all
    trained_on = next(row for row in train if row.dimension == DIMENSION)
    subset.write_text("".join(row.to_json() + "\n" for row in [*picked, trained_on]))
    head_config = HeadTrainingConfig(**training["head"])
    assert head_config.reference == persrm.config.reference == "unconditioned"
    config = TrainConfig(data=subset, out=tmp_path / "out", head=head_config,
                         placement=persrm.config.placement, top_k=persrm.config.top_k,
                         cache_dir=tmp_path / "cache")
    prepared = prepare(lm, config, model_sha=model_sha)
    assert [r.to_json() for r in prepared.val_rows] == [r.to_json() for r in picked]

    lm_head = lm.model.get_output_embeddings().weight.detach().float()
    reports = validation_reports(persrm.head, prepared, lm_head, head_config,
                                 lm.tokenizer.eos_token_id)
    for head in ("head", "untrained_head"):
        assert (reports["all"][head]["per_dimension"][DIMENSION]
                == recorded[head]["per_dimension"][DIMENSION]), head
