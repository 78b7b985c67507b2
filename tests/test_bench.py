"""``padlm bench``: every strategy runs, in one table, with the forward counts the design claims."""

import json
import subprocess
import sys

from padlm.bench.strategies import BENCH_STRATEGIES, bench, markdown_table, record_table

PADLM = [sys.executable, "-c", "from padlm.cli import main; main()"]


def test_every_bench_strategy_runs_and_counts_its_forwards(tiny_engine):
    result = bench(tiny_engine, list(BENCH_STRATEGIES), [1, 2], new_tokens=3, repeats=1)
    rows = {(r["strategy"], r["batch_size"]): r for r in result["rows"]}
    batched = [s for s in BENCH_STRATEGIES if s != "reference-pad"]  # released code: batch 1
    assert set(rows) == {(s, 1) for s in BENCH_STRATEGIES} | {(s, 2) for s in batched}
    assert rows["reference-pad", 1]["forward_passes_per_token"] == 2.0
    for batch_size in (1, 2):
        passes = {s: rows[s, batch_size]["forward_passes_per_token"] for s in batched}
        # one backbone forward per step for every cached strategy, the LoRA PersRM included
        # (base and PersRM lanes share one batched forward); the released pattern runs two
        # full recomputations per token
        # (a PersRM with an unconditioned reference adds a preference-free lane, not a pass;
        # mix runs its three experts as three lanes of one forward, soups as one lane)
        assert passes == {"base": 1.0, "prompt": 1.0, "pad": 1.0, "pad-echo-guard": 1.0,
                          "pad-conditioned": 1.0,
                          "pad-unconditioned": 1.0, "pad-lora": 1.0, "linear-alignment": 1.0,
                          "args": 1.0, "args-persrm": 1.0, "mix": 1.0, "soups": 1.0}
        assert rows["base", batch_size]["overhead_vs_base"] == 1.0
    assert "| reference-pad | 1 |" in markdown_table(result)


def test_a_recorded_run_says_what_ran_and_renders_as_the_reports_table(tmp_path):
    result = subprocess.run([
        *PADLM, "bench", "--strategies", "base,pad", "--batch-size", "1,2",
        "--max-new-tokens", "2", "--repeats", "1", "--device", "cpu",
        "--record", str(tmp_path / "run.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["command"].startswith("padlm bench --strategies base,pad")
    assert record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["threads"] >= 1 and record["torch"] and record["model"]
    assert record["commit"] is None or len(record["commit"].split("+")[0]) == 40
    assert record["persrm"]["path"].endswith("persrm-default")  # the shipped one
    assert len(record["persrm"]["fingerprint"]) == 16 and record["experts"] is None
    assert {(r["strategy"], r["batch_size"]) for r in record["rows"]} == {
        ("base", 1), ("pad", 1), ("base", 2), ("pad", 2)}
    table = record_table(record)
    assert table.splitlines()[2].startswith("| base | ") and "| pad | " in table
    assert record["command"] in table
    shown = subprocess.run([*PADLM, "bench", "table", str(tmp_path / "run.json")],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() == table
    bad = subprocess.run([*PADLM, "bench", "table", str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a padlm bench --record file" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_reference_pad_is_the_engines_pad_token_for_token(default_lm):
    """The twenty-line specification and the engine (KV caches, batching, the strategy
    registry) choose the same tokens, on the real default model with a head far enough from
    the identity to change PAD's choices."""
    from test_decoding import perturbed_persrm

    from padlm import GenerationConfig, Personalizer
    from padlm.bench.strategies import reference_pad
    from padlm.core.prompting import render

    engine = Personalizer(default_lm, persrm=perturbed_persrm(default_lm, scale=0.02))
    config = GenerationConfig(max_new_tokens=24, ignore_eos=True, top_k=10, weight=1.0)
    for prompt in ("Why is the sky blue?", "Give me a tip for learning to cook."):
        request = engine.request(prompt, "P1A")
        ids = render(engine.lm.tokenizer, prompt, request.preference.text, engine.placement)
        [generated] = engine.generate([prompt], "P1A", "pad", config)
        prompted = engine.generate([prompt], "P1A", "prompt", config)[0].tokens
        assert reference_pad(engine, ids, 24) == generated.tokens != prompted
