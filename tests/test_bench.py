"""``padlm bench``: every strategy runs, in one table, with the forward counts the design claims."""

from padlm.bench import BENCH_STRATEGIES, bench, markdown_table


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
                          "args": 1.0, "mix": 1.0, "soups": 1.0}
        assert rows["base", batch_size]["overhead_vs_base"] == 1.0
    assert "| reference-pad | 1 |" in markdown_table(result)
