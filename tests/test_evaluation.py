"""The harness: win-rate and bootstrap math against brute force, resume after a crash,
combined and free-text preferences, clear errors, and one run on the real model."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from padlm.core.config import GenerationConfig
from padlm.core.engine import Personalizer
from padlm.core.persrm import PersonalizedRewardModel
from padlm.errors import PadlmError
from padlm.evaluation import harness
from padlm.evaluation.harness import EvalPlan, Job
from padlm.evaluation.report import headline_table
from padlm.evaluation.stats import (
    bootstrap_ci,
    outcomes,
    paired_differences,
    standard_error,
    win_rate,
)
from padlm.records import read_jsonl

PADLM = str(Path(sys.executable).parent / "padlm")
SPEED_KEYS = {"seconds_per_response", "tokens_per_second"}


# ---------------------------------------------------------------- stats vs brute force


def brute_win_rate(method, base, sign):
    total = 0.0
    for m, b in zip(method, base, strict=True):
        if sign * m > sign * b:
            total += 1
        elif m == b:
            total += 0.5
    return total / len(method)


@pytest.mark.parametrize("sign", [1, -1])
def test_win_rate_matches_brute_force(sign):
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        method = rng.integers(0, 4, n).astype(float)  # small ints: plenty of ties
        base = rng.integers(0, 4, n).astype(float)
        assert win_rate(method, base, sign) == pytest.approx(brute_win_rate(method, base, sign))
    assert list(outcomes([3, 1, 2], [1, 3, 2], -1)) == [0.0, 1.0, 0.5]


def test_bootstrap_matches_exhaustive_enumeration():
    """Every one of the n^n equally likely resamples, enumerated: the exact bootstrap
    distribution of the mean. The sampled interval must sit on its 2.5/97.5 quantiles."""
    values = [1.0, 0.0, 0.5, 1.0, 1.0]
    means = sorted(np.mean(c) for c in itertools.product(values, repeat=len(values)))
    exact_lo, exact_hi = np.quantile(means, 0.025), np.quantile(means, 0.975)
    lo, hi = bootstrap_ci(values, samples=20000, seed=3)
    assert lo == pytest.approx(exact_lo, abs=0.1 + 1e-9)
    assert hi == pytest.approx(exact_hi, abs=0.1 + 1e-9)
    # with a huge sample the percentile points land on the exact distribution's atoms
    assert lo in {round(m, 10) for m in means} or min(abs(lo - m) for m in means) < 1e-9
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5)
    assert bootstrap_ci([1.0, 0.0], seed=0) == bootstrap_ci([1.0, 0.0], seed=0)


def test_bootstrap_equals_naive_loop():
    values = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0])
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(values), size=(500, len(values)))
    naive = sorted(sum(values[i] for i in row) / len(values) for row in idx)
    lo, hi = bootstrap_ci(values, samples=500, seed=7)
    assert lo == pytest.approx(np.quantile(naive, 0.025))
    assert hi == pytest.approx(np.quantile(naive, 0.975))


def test_paired_differences_by_hand():
    # a - b per prompt: 0.5, 0, 0.5, 1 -> mean 0.5; sd = sqrt(((0)^2+(.5)^2+0+(.5)^2)/3)
    a, b, c = [1.0, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]
    pairs = paired_differences({"a": a, "b": b, "c": c})
    assert list(pairs) == ["a - b", "a - c", "b - c"]
    assert pairs["a - b"] == {"difference": 0.5, "se": round((0.5 / 3) ** 0.5 / 2, 4),
                              "prompts": 4}
    assert pairs["a - c"]["difference"] == -0.125
    assert standard_error([2.0, 4.0]) == pytest.approx(1.0)
    assert np.isnan(standard_error([1.0]))


# ---------------------------------------------------------------- harness on a tiny model


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"id": f"q{i}", "prompt": p} for i, p in enumerate(
        ["Why is the sky blue?", "Name a fruit.", "What is 2+2?", "Describe a cat.",
         "How do plants grow?"])]))
    return str(path)


def plan_for(prompts_file, **overrides) -> EvalPlan:
    base = dict(benchmark=prompts_file, preferences=["P1A", "P3B"],
                strategies=["base", "prompt", "pad", "linear-alignment"], weights=[0.5],
                config=GenerationConfig(max_new_tokens=6), batch_size=2)
    base.update(overrides)
    return EvalPlan(**base)


def strip_speed(summary):
    """A copy without wall-clock fields (they differ between runs by nature)."""
    summary = copy.deepcopy(summary)
    for row in summary["rows"]:
        for key in SPEED_KEYS:
            row.pop(key)
    for agg in summary["aggregate"].values():
        for key in SPEED_KEYS:
            agg.pop(key)
    return summary


def test_resume_after_interruption_gives_same_summary(tiny_engine, prompts_file, tmp_path):
    plan = plan_for(prompts_file)
    whole = harness.run(tiny_engine, plan, tmp_path / "whole", progress=False)
    # crash mid-job (base: 5, then 1 chunk of 2 of the next job), plus a torn last line
    broken = tmp_path / "broken"
    harness.generate(tiny_engine, plan, broken, progress=False, stop_after=7)
    lines = (broken / harness.GENERATIONS).read_text().splitlines()
    assert len(lines) == 7
    with (broken / harness.GENERATIONS).open("a") as handle:
        handle.write('{"key": "torn')
    resumed = harness.run(tiny_engine, plan, broken, progress=False)
    assert strip_speed(resumed) == strip_speed(whole)
    records = read_jsonl(broken / harness.GENERATIONS)
    assert len(records) == len({r["key"] for r in records})  # nothing generated twice
    # 5 prompts: base once + 2 prefs x (prompt, la, pad@0.5, pad@1.0)
    assert len(records) == 5 * (1 + 2 * 4)
    # a third run generates nothing and rescores nothing
    before = (broken / harness.SCORES).read_text()
    again = harness.run(tiny_engine, plan, broken, progress=False)
    assert (broken / harness.SCORES).read_text() == before
    assert strip_speed(again) == strip_speed(whole)


def test_a_new_persrm_at_the_same_path_regenerates_only_its_strategies(
        tiny_lm, prompts_file, tmp_path):
    persrm_dir = tmp_path / "persrm"
    hidden = tiny_lm.model.config.hidden_size
    PersonalizedRewardModel.identity(tiny_lm.name, hidden).save(persrm_dir)
    plan = plan_for(prompts_file, strategies=["base", "prompt", "pad"], weights=[])
    first = harness.run(Personalizer(tiny_lm, persrm=str(persrm_dir)), plan, tmp_path / "run",
                        progress=False)
    retrained = PersonalizedRewardModel.identity(tiny_lm.name, hidden)
    retrained.head.weight.data.mul_(3.0)  # a "newly trained" head, saved over the old one
    retrained.save(persrm_dir)
    second = harness.run(Personalizer(tiny_lm, persrm=str(persrm_dir)), plan, tmp_path / "run",
                         progress=False)
    records = read_jsonl(tmp_path / "run" / harness.GENERATIONS)
    per_strategy = {s: sum(r["strategy"] == s for r in records) for s in ("base", "prompt", "pad")}
    assert per_strategy == {"base": 5, "prompt": 10, "pad": 20}  # only pad ran twice
    assert first["persrm"]["fingerprint"] != second["persrm"]["fingerprint"]
    assert all(r["n"] == 5 for r in second["rows"])


def test_args_cells_are_keyed_by_their_scorer(tiny_lm, prompts_file, tmp_path):
    """args and best-of-n cells carry their scorer's fingerprint: the PersRM's own under
    ``scorer="persrm"`` (what every args cell was keyed by before the scorer was a choice,
    so those cells are reused there and only there), the dimension rewards' by default; the
    summary and report name the scorer. Free text is refused before anything generates."""
    plan = plan_for(prompts_file, preferences=["P1A"], strategies=["base", "args"])
    persrm = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    by_default = harness.run(Personalizer(tiny_lm, persrm=persrm), plan, tmp_path,
                             progress=False)
    by_persrm = harness.run(Personalizer(tiny_lm, persrm=persrm, scorer="persrm"), plan,
                            tmp_path, progress=False)
    records = read_jsonl(tmp_path / harness.GENERATIONS)
    rewards = [json.loads(r["key"])[5] for r in records if r["strategy"] == "args"]
    assert len(rewards) == 10  # the second scorer regenerated every args cell
    assert rewards[:5] == [by_default["scorer"]["fingerprint"]] * 5
    assert by_default["scorer"]["name"] == "dimensions"
    assert rewards[5:] == [persrm.fingerprint()] * 5  # the pre-scorer key
    assert by_persrm["scorer"] == {"name": "persrm", "fingerprint": persrm.fingerprint()}
    assert sum(r["strategy"] == "base" for r in records) == 5  # base was reused
    assert "args and best-of-n scored by `persrm`" in (tmp_path / "report.md").read_text()
    free = plan_for(prompts_file, preferences=["Answer like a pirate"],
                    strategies=["base", "args"], directions=[("friendliness", 1)])
    with pytest.raises(PadlmError, match="free-text preference 'Answer like a pirate'"):
        harness.run(Personalizer(tiny_lm, persrm=persrm), free, tmp_path / "free",
                    progress=False)
    assert not (tmp_path / "free" / harness.GENERATIONS).exists()


def test_echo_guarded_eval_guards_only_guidance_cells_and_keeps_old_keys(
        tiny_engine, prompts_file, tmp_path):
    # runs saved before the guard (and the mix setting) existed keep their keys: at their
    # defaults they add nothing to the key
    assert not {"echo_guard", "mix"} & set(harness.config_key(GenerationConfig()))
    guarded_plan = plan_for(prompts_file, config=GenerationConfig(max_new_tokens=6,
                                                                  echo_guard=True))
    summary = harness.run(tiny_engine, guarded_plan, tmp_path, progress=False)  # prompt, base ok
    assert {r["strategy"] for r in summary["rows"]} == {"base", "prompt", "pad",
                                                        "linear-alignment"}
    records = read_jsonl(tmp_path / harness.GENERATIONS)
    assert all(r["config"]["echo_guard"] is True for r in records)
    assert "echo guard on pad / linear-alignment" in (tmp_path / "report.md").read_text()


def test_summary_schema_and_report(tiny_engine, prompts_file, tmp_path):
    summary = harness.run(tiny_engine, plan_for(prompts_file), tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("benchmark", "model", "persrm", "rows"):
        assert key in on_disk
    assert "acceptance" not in on_disk  # the summary reports measurements, not a ticket's bar
    assert on_disk["persrm"]["identity_head"] is True
    row = next(r for r in on_disk["rows"] if r["label"] == "prompt" and r["preference"] == "P1A")
    for key in ("strategy", "params", "preference", "n", "win_rate", "win_rate_ci", "judges",
                "relevance", "rep4", "seconds_per_response", "tokens_per_second"):
        assert key in row
    assert row["n"] == 5 and row["direction"] == {"judge": "expertise", "sign": -1}
    lo, hi = row["win_rate_ci"]
    assert lo <= row["win_rate"] <= hi
    base_rows = [r for r in on_disk["rows"] if r["strategy"] == "base"]
    assert all(r["win_rate"] == 0.5 for r in base_rows)  # base vs itself: all ties
    labels = {r["label"] for r in on_disk["rows"]}
    assert {"pad@weight=0.5", "pad@weight=1"} <= labels
    assert (tmp_path / "report.md").read_text().startswith("# P-Soups evaluation")
    assert (tmp_path / "win_rates.png").stat().st_size > 1000
    assert (tmp_path / "pad_weight_sweep.png").stat().st_size > 1000


def test_report_orders_strategies_as_the_run_did():
    """summary.json sorts the aggregate's keys; the report restores the run's order (base
    first, then --strategies as given) with the swept weights ascending."""
    def agg(strategy, weight=None, headline=True):
        return {"strategy": strategy, "params": {} if weight is None else {"weight": weight},
                "headline": headline, "mean_win_rate": 0.5, "relevance": 0.7, "rep4": 0.0,
                "echo_rate": 0.0, "seconds_per_response": 1.0, "tokens_per_second": 9.0}

    run_order = ["base", "linear-alignment", "pad", "prompt"]
    summary = {
        "rows": [{"strategy": s, "label": s, "preference": "P1A", "win_rate": 0.5}
                 for s in run_order],
        "aggregate": {"base": agg("base"), "linear-alignment": agg("linear-alignment"),
                      "pad@weight=1": agg("pad", 1.0), "pad@weight=0.5": agg("pad", 0.5, False),
                      "prompt": agg("prompt")},
    }
    lines = headline_table(summary).splitlines()[2:]
    assert [line.split(" | ")[0].strip("| ") for line in lines] == [
        "base", "linear-alignment", "pad@weight=1", "prompt"]


def test_combined_and_free_text_preferences(tiny_engine, prompts_file, tmp_path):
    plan = plan_for(prompts_file, preferences=["P1A+P2A+P3A", "Answer like a pirate"],
                    strategies=["base", "prompt"], directions=[("friendliness", 1),
                                                               ("informativeness", -1)])
    summary = harness.run(tiny_engine, plan, tmp_path, progress=False)
    combo = [r for r in summary["rows"] if r.get("combination") == "P1A+P2A+P3A"
             and r["strategy"] == "prompt"]
    assert [r["preference"] for r in combo] == ["P1A", "P2A", "P3A"]
    free = [r for r in summary["rows"] if r.get("combination") == "Answer like a pirate"
            and r["strategy"] == "prompt"]
    assert [r["preference"] for r in free] == ["friendliness:+", "informativeness:-"]
    # the combination was generated once, not once per dimension
    records = read_jsonl(tmp_path / harness.GENERATIONS)
    assert sum(r["preference"] == "P1A+P2A+P3A" for r in records) == 5


def test_expert_cells_with_their_mixing_weights(tiny_lm, prompts_file, tmp_path):
    """``mix:uniform`` / ``mix:logit`` / ``soups`` cells on a combination: labelled as
    named, decoded with that mix setting, summarised over the combination's cells with
    paired SEs; new experts at the same path regenerate only the expert cells."""
    plan = plan_for(prompts_file, preferences=["P1A+P2B"],
                    strategies=["base", "prompt", "mix:uniform", "mix:logit", "soups"])
    engine = Personalizer(tiny_lm, persrm="identity")
    summary = harness.run(engine, plan, tmp_path, progress=False)
    assert {r["label"] for r in summary["rows"]} == {"base", "prompt", "mix:uniform",
                                                     "mix:logit", "soups"}
    records = read_jsonl(tmp_path / harness.GENERATIONS)
    logit = [r for r in records if r["label"] == "mix:logit"]
    expected = engine.generate([harness.load_benchmark(prompts_file)[0]["prompt"]], "P1A+P2B",
                               "mix", GenerationConfig(max_new_tokens=6, mix="logit"))[0]
    assert logit[0]["text"] == expected.text
    combos = summary["combinations"]
    assert combos["cells"] == 2 and combos["combinations"] == ["P1A+P2B"]
    assert list(combos["labels"]) == ["prompt", "mix:uniform", "mix:logit", "soups"]
    for label, stats in combos["labels"].items():
        mine = [r["win_rate"] for r in summary["rows"] if r["label"] == label]
        assert stats["mean_win_rate"] == pytest.approx(np.mean(mine), abs=1e-4)
    assert "mix:uniform - soups" in combos["paired"]
    assert "## Combinations" in (tmp_path / "report.md").read_text()
    # other experts (prompted, two dimensions only): only the expert cells rerun
    from padlm.orchestration.experts import engine_experts, prompted_experts
    experts = prompted_experts(tiny_lm, ("P1A", "P2B"))
    engine = Personalizer(tiny_lm, persrm="identity", components={"experts": experts})
    assert engine_experts(engine).fingerprint() != engine_experts(Personalizer(
        tiny_lm, persrm="identity")).fingerprint()
    harness.run(engine, plan, tmp_path, progress=False)
    records = read_jsonl(tmp_path / harness.GENERATIONS)
    assert sum(r["label"] == "prompt" for r in records) == 5
    assert sum(r["label"] == "mix:uniform" for r in records) == 10


def test_clear_errors(prompts_file):
    with pytest.raises(PadlmError, match="unknown strategy"):
        harness.jobs(plan_for(prompts_file, strategies=["base", "magic"]), 1.0)
    with pytest.raises(PadlmError, match="unknown preference id"):
        harness.dimensions("P9Z", [])
    with pytest.raises(PadlmError, match="needs at least one --judge"):
        harness.dimensions("be nice", [])
    with pytest.raises(PadlmError, match="unknown benchmark"):
        harness.load_benchmark("no-such-benchmark")
    assert len(harness.load_benchmark("psoups")) == 50
    assert len(harness.load_benchmark("psoups", limit=3)) == 3
    assert Job("P1A", "pad", (("weight", 0.5),)).label == "pad@weight=0.5"
    assert Job("P1A+P2B", "mix", (("mix", "pcm"),)).label == "mix:pcm"
    assert harness.parse_cell("mix:logit") == ("mix", (("mix", "logit"),))
    for entry in ("prompt:uniform", "mix:telepathy", "magic:pcm"):
        with pytest.raises(PadlmError, match="unknown strategy|mixing weights"):
            harness.parse_cell(entry)


@pytest.mark.parametrize(("args", "message"), [
    (["--preferences", "P1A,P7Q"], "unknown preference id"),
    (["--strategies", "base,nope"], "unknown strategy"),
    (["--preferences", "be brief", "--judge", "wit:+"], "unknown judge"),
    (["train-harmlessness"], "Missing option '--data'"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    result = subprocess.run([PADLM, "eval", "--out",
                             str(tmp_path), "--limit", "1", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_real_model_eval_cli(tmp_path):
    """`padlm eval` end to end on SmolLM2: 2 prompts, 2 preferences, 4 tokens."""
    result = subprocess.run(
        [PADLM, "eval", "--limit", "2", "--preferences",
         "P2A,P3A", "--strategies", "base,prompt,pad", "--weights", "", "--max-new-tokens",
         "4", "--out", str(tmp_path), "--persrm", "identity", "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] and summary["persrm"]["name"] == "identity"
    assert {r["label"] for r in summary["rows"]} == {"base", "prompt", "pad@weight=1"}
    assert "padlm eval" in summary["command"]
    assert all(r["n"] == 2 for r in summary["rows"])


def test_single_preferences_get_standard_errors_and_paired_differences(tiny_lm, prompts_file,
                                                                       tmp_path):
    """The headline's mean win over the single P-Soups preferences comes with its SE over
    prompts and paired differences: each label's mean equals the mean of its rows, and the
    paired difference equals the difference of the two means."""
    plan = plan_for(prompts_file, strategies=["base", "prompt", "linear-alignment"], weights=[])
    summary = harness.run(Personalizer(tiny_lm, persrm="identity"), plan, tmp_path,
                          progress=False)
    singles = summary["singles"]
    assert singles["cells"] == 2 and list(singles["labels"]) == ["prompt", "linear-alignment"]
    for label, stats in singles["labels"].items():
        mine = [r["win_rate"] for r in summary["rows"] if r["label"] == label]
        assert stats["mean_win_rate"] == pytest.approx(np.mean(mine), abs=1e-4)
        assert stats["se"] >= 0 and stats["prompts"] == summary["prompts"]
    pair = singles["paired"]["prompt - linear-alignment"]
    means = singles["labels"]
    assert pair["difference"] == pytest.approx(
        means["prompt"]["mean_win_rate"] - means["linear-alignment"]["mean_win_rate"], abs=2e-4)
    assert "paired differences" in (tmp_path / "report.md").read_text()
