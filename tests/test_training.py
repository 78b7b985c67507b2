"""PersRM training: restricted log-probs, the cache (resume), DPO head training, save/load,
and the LoRA stage through TRL, on a tiny random model; one check on the real model."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from padlm.core.persrm import PersonalizedRewardModel
from padlm.data.schema import PreferenceRow
from padlm.errors import PadlmError
from padlm.training import cache as cache_module
from padlm.training.cache import (
    MAX_RESPONSE_TOKENS,
    HiddenStateCache,
    ReferenceCache,
    encode_sequence,
    response_states,
    row_key,
)
from padlm.training.configs import HeadTrainingConfig, TrainConfig
from padlm.training.head import (
    HeadParam,
    collate,
    dimension_weights,
    dpo_loss,
    end_of_turn_report,
    evaluate,
    restricted_log_probs,
    token_log_probs,
    train_head,
)
from padlm.training.pipeline import consistency_scores, run_training

PROMPTS = ["Name a fruit.", "What is rain?", "Say something about cats.", "Describe the sea.",
           "Why do birds sing?", "What is a star?", "Tell me about bread.", "What is snow?"]


def tiny_rows() -> list[PreferenceRow]:
    """Mirrored pairs: short answers preferred under P2A, long ones under P2B."""
    rows = []
    for i, prompt in enumerate(PROMPTS):
        short, long = f"Short answer {i}.", f"A much longer and more detailed answer number {i}."
        for pid, chosen, rejected, other in (("P2A", short, long, "P2B"),
                                             ("P2B", long, short, "P2A")):
            rows.append(PreferenceRow(prompt, f"pref {pid}", chosen, rejected, pid, "test",
                                      meta={"key": [str(i), pid], "mirror": [str(i), other]}))
    return rows


def test_restricted_log_probs_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(3, 4)  # 3 candidates + the target column
    candidates = torch.tensor([[5, 7, 9], [5, 7, 9], [1, 2, 3]])
    targets = torch.tensor([7, 4, 3])
    got = restricted_log_probs(logits, candidates, targets)
    expected = [
        logits[0, :3].log_softmax(-1)[1],  # target among the candidates: counted once
        logits[1].log_softmax(-1)[3],  # target outside: k + 1 entries
        logits[2, :3].log_softmax(-1)[2],
    ]
    assert torch.allclose(got, torch.stack(expected))


def test_head_forms_start_at_identity_and_export_w():
    h = torch.randn(5, 8)
    for form in ("full", "lowrank", "diagonal"):
        head = HeadParam(8, form, rank=2)
        assert torch.allclose(head(h), h)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.1 * torch.randn_like(p))
        assert torch.allclose(head(h), h @ head.weight().T + head.bias, atol=1e-5)
        assert torch.allclose(head.distance_from_identity(),
                              (head.weight() - torch.eye(8)).pow(2).sum() + head.bias.pow(2).sum(),
                              atol=1e-5)


def test_cache_resumes_after_interruption(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_ROWS", 4)
    rows = tiny_rows()
    cache = HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha")
    calls = []

    def crash(n):
        calls.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.build(progress=crash)
    assert calls == [4] and cache.missing() == list(range(4, len(rows)))
    assert cache.build() == len(rows) - 4 and cache.build() == 0
    fresh = HiddenStateCache(tmp_path / "fresh", tiny_lm, rows, "user-prefix", 5, "sha")
    fresh.build()
    for (a, b), (c, d) in zip(cache.load(), fresh.load(), strict=True):
        assert torch.equal(a.hidden, c.hidden) and torch.equal(b.hidden, d.hidden)
        assert torch.equal(a.targets, c.targets) and torch.equal(b.targets, d.targets)
    assert HiddenStateCache(tmp_path, tiny_lm, rows, "system", 5, "sha").directory != \
        cache.directory


def test_cache_is_addressed_by_row_content(tiny_lm, tmp_path, monkeypatch):
    """Reordered, grown or edited data recomputes only the rows no shard holds."""
    monkeypatch.setattr(cache_module, "SHARD_ROWS", 4)
    rows = tiny_rows()
    HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha").build()
    reordered = HiddenStateCache(tmp_path, tiny_lm, rows[::-1], "user-prefix", 5, "sha")
    assert reordered.missing() == []
    expected = {row_key(r): pair for r, pair in zip(
        rows, HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha").load(),
        strict=True)}
    for row, (chosen, rejected) in zip(rows[::-1], reordered.load(), strict=True):
        assert torch.equal(chosen.hidden, expected[row_key(row)][0].hidden)
        assert torch.equal(rejected.hidden, expected[row_key(row)][1].hidden)
    edited = [*rows[:3], replace(rows[3], chosen="An edited answer."), *rows[4:]]
    retagged = [replace(r, source="elsewhere", meta={}) for r in edited]
    new = PreferenceRow("A new prompt?", "pref P2A", "Yes.", "No, not at all.", "P2A", "test")
    changed = HiddenStateCache(tmp_path, tiny_lm, [*retagged, new, new], "user-prefix", 5, "sha")
    assert changed.missing() == [3, len(rows)]  # the edit and one copy of the new row
    assert changed.build() == 2 and changed.missing() == []
    pairs = changed.load()
    assert torch.equal(pairs[0][0].hidden, expected[row_key(rows[0])][0].hidden)
    assert torch.equal(pairs[-1][0].hidden, pairs[-2][0].hidden)
    with pytest.raises(PadlmError, match="lacks a row"):
        HiddenStateCache(tmp_path, tiny_lm, [replace(new, rejected="Maybe.")], "user-prefix",
                         5, "sha").load()


def test_a_response_cut_at_the_limit_gets_no_end_of_turn_target(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    fits = " ".join(["word"] * 8)
    _, short = encode_sequence(tokenizer, "Hi", "", fits, "user-prefix")
    assert short == [*tokenizer(fits, add_special_tokens=False)["input_ids"],
                     tokenizer.eos_token_id]
    long_text = " ".join(["word"] * (2 * MAX_RESPONSE_TOKENS))
    _, cut = encode_sequence(tokenizer, "Hi", "", long_text, "user-prefix")
    assert cut == tokenizer(long_text, add_special_tokens=False)["input_ids"][
        :MAX_RESPONSE_TOKENS]
    assert tokenizer.eos_token_id not in cut


def test_cached_states_match_a_plain_forward(tiny_lm):
    rows = tiny_rows()
    context, response = encode_sequence(tiny_lm.tokenizer, rows[0].prompt, rows[0].preference,
                                        rows[0].chosen, "user-prefix")
    assert response[-1] == tiny_lm.tokenizer.eos_token_id
    [states] = response_states(tiny_lm.model, [context], [response], top_k=5)
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([context + response])).logits[0].float()
    expected = logits[len(context) - 1:-1].log_softmax(-1).gather(
        1, torch.tensor(response)[:, None])[:, 0]
    assert torch.allclose(states.base_logp, expected, atol=1e-4)
    # padding in a batch changes nothing
    [again, _] = response_states(tiny_lm.model, [context, context + [1] * 7],
                                 [response, response], top_k=5)
    assert torch.allclose(again.base_logp, states.base_logp, atol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_shared_context_prefill_equals_a_whole_sequence_forward(which, tiny_lm, default_lm):
    """Each distinct context prefilled once (its KV cache shared by the responses after it)
    gives the states of one whole-sequence forward, padding and repeats included."""
    from padlm.core.kvstream import response_hidden, shared_context_hidden

    model = (tiny_lm if which == "tiny" else default_lm).model
    contexts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [7, 8]]
    responses = [[20, 21, 22], [30], [40, 41, 42, 43, 44], [50, 51], [60, 61]]
    shared = shared_context_hidden(model, contexts, responses)
    for got, expected in zip(shared, response_hidden(model, contexts, responses), strict=True):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4)


def test_cache_batches_keep_a_rows_two_sequences_together(tiny_lm, tmp_path, monkeypatch):
    """Chosen and rejected share their context's prefill only in one batch."""
    seen = []
    real = cache_module.shared_context_hidden

    def spy(model, contexts, responses):
        seen.append([tuple(c) for c in contexts])
        return real(model, contexts, responses)

    monkeypatch.setattr(cache_module, "shared_context_hidden", spy)
    HiddenStateCache(tmp_path, tiny_lm, tiny_rows(), "user-prefix", 5, "sha").build(batch_size=4)
    assert seen and all(len(batch) % 2 == 0 for batch in seen)
    assert all(batch[i] == batch[i + 1] for batch in seen for i in range(0, len(batch), 2))


def test_reference_cache_matches_a_preference_free_forward_and_resumes(tiny_lm, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_ROWS", 4)
    rows = tiny_rows()
    primary = HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha")
    primary.build()
    pairs = primary.load()
    reference = ReferenceCache(primary, pairs)
    assert reference.directory != primary.directory
    with pytest.raises(KeyboardInterrupt):
        reference.build(progress=lambda n: (_ for _ in ()).throw(KeyboardInterrupt))
    assert reference.missing() == list(range(4, len(rows)))
    assert reference.build() == len(rows) - 4 and reference.build() == 0
    reference.attach()
    row, (chosen, _) = rows[5], pairs[5]
    context, response = encode_sequence(tiny_lm.tokenizer, row.prompt, "", row.chosen,
                                        "user-prefix")
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([context + response])).logits[0, len(context) - 1:-1]
    ids = torch.cat([chosen.candidates, chosen.targets[:, None]], dim=1)
    assert torch.allclose(chosen.reference_k, logits.float().gather(1, ids), atol=1e-4)
    assert torch.allclose(chosen.reference_logp, logits.float().log_softmax(-1).gather(
        1, chosen.targets[:, None])[:, 0], atol=1e-4)


def test_untrained_head_reward_is_zero_conditioned_and_pmi_unconditioned(tiny_lm, tmp_path):
    rows = tiny_rows()
    primary = HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha")
    primary.build()
    pairs = primary.load()
    reference = ReferenceCache(primary, pairs)
    reference.build()
    reference.attach()
    dims = [r.dimension for r in rows]
    lm_head = tiny_lm.model.get_output_embeddings().weight.detach().float()
    conditioned = evaluate(None, pairs, dims, lm_head, "full", "conditioned")
    assert conditioned["margin"] == 0 and conditioned["accuracy"] == 0.5
    pmi = [float((c.base_logp - c.reference_logp).sum() - (r.base_logp - r.reference_logp).sum())
           for c, r in pairs]
    unconditioned = evaluate(None, pairs, dims, lm_head, "full", "unconditioned")
    assert unconditioned["margin"] == pytest.approx(sum(pmi) / len(pmi), abs=1e-3)
    assert unconditioned["accuracy"] == pytest.approx(
        sum((m > 0) + 0.5 * (m == 0) for m in pmi) / len(pmi))


def test_dpo_loss_decreases_and_consistency_is_mirrored(tiny_lm, tmp_path):
    rows = tiny_rows()
    cache = HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha")
    cache.build()
    pairs = cache.load()
    scores = consistency_scores(rows, pairs)
    assert scores[0] == pytest.approx(scores[1])  # a pair and its mirror share one score
    lm_head = tiny_lm.model.get_output_embeddings().weight.detach().float()
    for vocab in ("topk", "full"):
        config = HeadTrainingConfig(form="lowrank", rank=4, lr=5e-2, epochs=10, batch_pairs=8,
                                    beta=0.5, vocab=vocab)
        _, history = train_head(pairs, lm_head, config, pairs, [r.dimension for r in rows])
        assert history[-1]["loss"] < history[0]["loss"] - 0.01, vocab
        assert history[-1]["validation"]["margin"] > history[0]["validation"]["margin"]


def test_dimension_weights_interpolate_from_every_pair_to_every_dimension():
    dims = ["hh", "hh", "hh", "P2A"]
    assert dimension_weights(dims, 0.0).tolist() == [1.0] * 4
    # balance 1: weights 1/3, 1/3, 1/3, 1 scaled to mean 1 -> each dimension sums to 2
    assert dimension_weights(dims, 1.0).tolist() == pytest.approx([2 / 3] * 3 + [2.0])
    # balance 0.5: 3^-0.5 thrice and 1, scaled to mean 1
    raw = [3 ** -0.5] * 3 + [1.0]
    expected = [4 * w / sum(raw) for w in raw]
    assert dimension_weights(dims, 0.5).tolist() == pytest.approx(expected)


def test_weighted_dpo_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    beta, weights = 0.5, torch.tensor([0.5, 1.5])
    terms = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]  # -log sigmoid(beta*m)
    assert float(dpo_loss(chosen, rejected, beta)) == pytest.approx(sum(terms) / 2)
    assert float(dpo_loss(chosen, rejected, beta, weights)) == pytest.approx(
        (0.5 * terms[0] + 1.5 * terms[1]) / 2)


def test_a_balanced_head_trains_on_each_pairs_dimension(tiny_lm, tmp_path):
    # 8 P2A pairs and 3 P2B: unequal, so balancing changes the weights
    rows = [r for i, r in enumerate(tiny_rows()) if r.dimension == "P2A" or i < 6]
    cache = HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha")
    cache.build()
    pairs = cache.load()
    lm_head = tiny_lm.model.get_output_embeddings().weight.detach().float()
    config = HeadTrainingConfig(rank=4, lr=5e-2, epochs=2, batch_pairs=4,
                                dimension_balance=1.0, nll_weight=0.1)
    with pytest.raises(PadlmError, match="each training pair's dimension"):
        train_head(pairs, lm_head, config)
    balanced, _ = train_head(pairs, lm_head, config, dimensions=[r.dimension for r in rows])
    plain, _ = train_head(pairs, lm_head, replace(config, dimension_balance=0.0))
    assert not torch.equal(balanced.v, plain.v)  # the weights reached the gradient
    with pytest.raises(PadlmError, match="between 0 and 1"):
        HeadTrainingConfig(dimension_balance=1.5)


def test_end_of_turn_report_averages_the_real_ends_only(tiny_lm, tmp_path):
    rows = tiny_rows()[:3]
    cut = " ".join(["word"] * (2 * MAX_RESPONSE_TOKENS))  # cut at the limit: no end there
    rows.append(replace(rows[0], chosen=cut, meta={"key": ["cut"]}))
    cache = HiddenStateCache(tmp_path, tiny_lm, rows, "user-prefix", 5, "sha")
    cache.build()
    pairs = cache.load()
    lm_head = tiny_lm.model.get_output_embeddings().weight.detach().float()
    eos = tiny_lm.tokenizer.eos_token_id
    expected = []
    for sequence in (seq for pair in pairs for seq in pair):
        if sequence.targets[-1] == eos:
            one = collate([sequence])
            expected.append(float(token_log_probs(None, one, lm_head, "topk")[-1]))
    report = end_of_turn_report(None, pairs, lm_head, "topk", eos)
    assert report["sequences"] == len(expected) == 7  # 8 sequences, one of them cut
    assert report["mean_logp"] == pytest.approx(sum(expected) / 7, abs=1e-4)


def test_train_save_load_round_trip_gives_identical_logits(tiny_lm, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in tiny_rows()))
    out = tmp_path / "persrm"
    config = TrainConfig(data=data, out=out, head=HeadTrainingConfig(epochs=2, lr=1e-2, rank=4),
                         cache_dir=tmp_path / "cache", validation_fraction=0.3,
                         command="test")
    trained = run_training(tiny_lm, config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["data_sha256"] and saved["training"]["base_model_sha256"]
    assert saved["training"]["command"] == "test" and len(saved["training"]["history"]) == 2
    assert not trained.head.is_identity()
    loaded = PersonalizedRewardModel.load(out)
    hidden = torch.randn(3, 32)
    lm_head = tiny_lm.model.get_output_embeddings().weight
    assert torch.equal(trained.reward_logits(hidden, lm_head),
                       loaded.reward_logits(hidden, lm_head))
    assert not list(tmp_path.glob("*.checkpoint.pt"))


def test_a_bfloat16_backbone_caches_apart_and_its_head_scores_float32_states(tiny_lm,
                                                                             tmp_path):
    """``train persrm --dtype bfloat16`` (the fast cache on a CPU with bf16 units): the record
    says which dtype made the states, the cache is not shared with float32's, and the saved
    head is plain float32, usable on a float32 backbone's states."""
    import copy

    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in tiny_rows()))
    half = replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).to(torch.bfloat16))
    for name, lm in (("float32", tiny_lm), ("bfloat16", half)):
        config = TrainConfig(data=data, out=tmp_path / name, cache_dir=tmp_path / "cache",
                             head=HeadTrainingConfig(epochs=1, rank=4),
                             validation_fraction=0.3, label_filter="none")
        assert run_training(lm, config).config.training["base_model_dtype"] == name
    assert len(list((tmp_path / "cache").iterdir())) == 2
    loaded = PersonalizedRewardModel.load(tmp_path / "bfloat16")
    lm_head = tiny_lm.model.get_output_embeddings().weight
    rewards = loaded.reward_logits(torch.randn(3, 32), lm_head)
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()


def test_held_out_axis_rows_are_never_trained_and_all_validate(tiny_lm, tmp_path):
    """Rows of a held-out axis (the unseen-preference test) stay out of training whatever
    their prompt's split, and every one of them is in the validation set."""
    from padlm.training.pipeline import prepare

    rows = tiny_rows()
    for row in rows:
        if row.dimension == "P2B":
            row.meta["held_out"] = True
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in rows))
    prepared = prepare(tiny_lm, TrainConfig(data=data, out=tmp_path / "out",
                                            cache_dir=tmp_path / "cache",
                                            validation_fraction=0.3, label_filter="none"))
    assert {r.dimension for r in prepared.train_rows} == {"P2A"}
    assert sum(r.dimension == "P2B" for r in prepared.val_rows) == len(PROMPTS)


def test_unconditioned_training_saves_its_reference_and_reports_the_untrained_head(
        tiny_lm, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in tiny_rows()))
    config = TrainConfig(data=data, out=tmp_path / "persrm", cache_dir=tmp_path / "cache",
                         head=HeadTrainingConfig(epochs=4, lr=5e-2, rank=4, beta=0.5,
                                                 reference="unconditioned"),
                         validation_fraction=0.3, label_filter="none")
    trained = run_training(tiny_lm, config)
    loaded = PersonalizedRewardModel.load(tmp_path / "persrm")
    assert loaded.config.reference == "unconditioned" and loaded.config.unconditioned
    history = trained.config.training["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    report = trained.config.training["validation"]["all"]
    assert {"head", "untrained_head", "baseline_mean_logprob"} <= set(report)
    assert report["untrained_head"]["margin"] != 0  # PMI, not the zero of W = I
    ends = trained.config.training["validation"]["end_of_turn"]
    assert ends["head"]["sequences"] == ends["untrained_head"]["sequences"] > 0
    assert ends["head"]["mean_logp"] != ends["untrained_head"]["mean_logp"]


def test_training_resumes_from_checkpoint(tiny_lm, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in tiny_rows()))
    head = HeadTrainingConfig(epochs=3, lr=1e-2, rank=4)
    config = TrainConfig(data=data, out=tmp_path / "a", head=head, cache_dir=tmp_path / "c",
                         validation_fraction=0.3)
    full = run_training(tiny_lm, config)
    import padlm.training.pipeline as pipeline

    calls = []
    original = pipeline.train_head

    def interrupted(*args, **kwargs):
        user = kwargs["on_epoch"]

        def on_epoch(record, h, opt):
            user(record, h, opt)
            calls.append(record)
            if len(calls) == 2:
                raise KeyboardInterrupt

        kwargs["on_epoch"] = on_epoch
        return original(*args, **kwargs)

    config_b = TrainConfig(data=data, out=tmp_path / "b", head=head, cache_dir=tmp_path / "c",
                           validation_fraction=0.3)
    pipeline.train_head = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(tiny_lm, config_b)
    finally:
        pipeline.train_head = original
    assert pipeline.checkpoint_path(config_b.out).exists()
    resumed = run_training(tiny_lm, config_b)
    assert torch.allclose(resumed.head.weight, full.head.weight, atol=1e-6)


def test_lora_stage_runs_on_cpu_and_loads(tiny_lm, tmp_path):
    import copy

    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in tiny_rows()))
    out = tmp_path / "persrm"
    config = TrainConfig(data=data, out=out, stage="both", lora_steps=2, lora_rank=2,
                         head=HeadTrainingConfig(epochs=1, rank=2), cache_dir=tmp_path / "c",
                         validation_fraction=0.3)
    trained = run_training(tiny_lm, config)
    assert trained.config.lora and (out / "adapter").is_dir()
    assert len(trained.config.training["lora"]["losses"]) == 2
    loaded = PersonalizedRewardModel.load(out, copy.deepcopy(tiny_lm.model))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = trained.backbone(input_ids=ids).logits
        b = loaded.backbone(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_real_model_cache_baseline_prefers_the_sampled_answer(default_lm, tmp_path):
    """On SmolLM2, the preference-conditioned model's own reply is likelier than a reply
    to another question (the untrained baseline works on an obvious pair)."""
    row = PreferenceRow("What is the capital of France?", "Be concise.",
                        "The capital of France is Paris.",
                        "Bananas are rich in potassium and grow in bunches.", "P2A", "test")
    cache = HiddenStateCache(tmp_path, default_lm, [row], "user-prefix", 10, "sha")
    cache.build()
    [(chosen, rejected)] = cache.load()
    assert chosen.base_logp.mean() > rejected.base_logp.mean()
    lm_head = default_lm.model.get_output_embeddings().weight.detach().float()
    batch = collate([chosen])
    identity = token_log_probs(HeadParam(576, "lowrank"), batch, lm_head, "topk")
    assert torch.allclose(identity, token_log_probs(None, batch, lm_head, "topk"))


def test_cli_train_rejects_bad_input(tmp_path):
    from typer.testing import CliRunner

    from padlm.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "persrm", "--data", str(tmp_path / "nope.jsonl"),
                                 "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, PadlmError) and "does not exist" in str(result.exception)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.to_json() + "\n" for r in tiny_rows()))
    result = runner.invoke(app, ["train", "persrm", "--data", str(data), "--out",
                                 str(tmp_path / "o"), "--form", "cubic"])
    assert isinstance(result.exception, PadlmError) and "head form" in str(result.exception)
    result = runner.invoke(app, ["train", "persrm", "--data", str(data), "--out",
                                 str(tmp_path / "o"), "--dimension-balance", "2"])
    assert isinstance(result.exception, PadlmError) and "between 0 and 1" in str(
        result.exception)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("name", "reference"), [("default", "unconditioned"),
                                                ("conditioned", "conditioned")])
def test_shipped_persrms_are_trained_for_the_default_model(name, reference):
    from padlm.core.guides import default_persrm_dir

    directory = default_persrm_dir(name)
    assert directory is not None
    persrm = PersonalizedRewardModel.load(directory)
    assert persrm.config.reference == reference
    assert persrm.config.base_model == "SmolLM2-135M-Instruct"
    assert persrm.config.hidden_size == 576 and not persrm.head.is_identity()
    training = persrm.config.training
    assert training["stage"] == "head" and training["data_sha256"] and training["command"]
    # the committed dataset is the one it was trained on
    data = Path(__file__).resolve().parents[1] / training["data"]
    assert hashlib.sha256(data.read_bytes()).hexdigest() == training["data_sha256"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("label_filter", "strict", "label filter"), ("stage", "all", "unknown stage"),
    ("placement", "footer", "unknown placement"), ("validation_fraction", 1.0, "fraction"),
])
def test_a_bad_training_setting_fails_when_the_config_is_made(tmp_path, field, value, message):
    """Before any model load or ~37-minute cache: the config refuses itself."""
    from padlm.training.configs import TrainConfig

    with pytest.raises(PadlmError, match=message):
        TrainConfig(data=tmp_path / "pairs.jsonl", out=tmp_path / "out", **{field: value})
