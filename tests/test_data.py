"""Preference data: row validation, splits, pools, HH conversion, the build (modes, refusals,
resume, record), label agreement, and the endpoint sampler against a live server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from padlm.data.axes import AXES, HELD_OUT_AXES, SIDES, generation_text
from padlm.data.build import (
    NEUTRAL_INSTRUCTION,
    REWRITE_INSTRUCTION,
    BuildConfig,
    Pair,
    build_dataset,
    clean_response,
    done_keys,
    is_degenerate,
    is_refusal,
    progress_summary,
)
from padlm.data.hh import convert_pair, harmless_rows
from padlm.data.labels import choose_modes, summarize
from padlm.data.pools import PoolPrompt, default_pool_dir, parse_dialogue, self_instruct_prompts
from padlm.data.samplers import (
    EndpointSampler,
    LocalSampler,
    Sample,
    SampleRequest,
    SamplingSettings,
    open_sampler,
)
from padlm.data.schema import PreferenceRow, load_rows, validate_row
from padlm.data.splits import split_rows
from padlm.errors import PadlmError

POOLS = Path(__file__).resolve().parents[1] / "data"  # the checkout's data/, passed explicitly
GOOD = {"prompt": "Say hi.", "preference": "Be brief.", "chosen": "Hi.",
        "rejected": "Hello there, how are you doing today?", "dimension": "P2A", "source": "t"}


def test_validate_row_names_each_problem():
    assert validate_row(GOOD) == []
    bad = dict(GOOD, chosen="", prompt=[{"role": "bot", "content": "x"}])
    del bad["source"]
    problems = validate_row(bad)
    assert "missing field 'source'" in problems
    assert "'chosen' is empty" in problems
    assert any("role" in p for p in problems)
    assert validate_row(dict(GOOD, rejected="Hi.")) == ["'chosen' and 'rejected' are identical"]
    assert validate_row([1]) == ["expected a JSON object, got list"]


def test_loader_reports_bad_rows_by_line_and_strict_is_fatal(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD), "{not json", "", json.dumps(dict(GOOD, dimension=3)),
             json.dumps(dict(GOOD, chosen="Yo."))]
    path.write_text("\n".join(lines) + "\n")
    rows, errors = load_rows(path)
    assert [r.chosen for r in rows] == ["Hi.", "Yo."]
    assert [n for n, _ in errors] == [2, 4]
    assert "invalid JSON" in errors[0][1] and "'dimension' must be a string" in errors[1][1]
    with pytest.raises(PadlmError, match=r"d.jsonl:2: invalid JSON.*d.jsonl:4"):
        load_rows(path, strict=True)


def test_cli_check_strict_exits_2(tmp_path):
    from typer.testing import CliRunner

    from padlm.cli import app

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n[]\n")
    result = CliRunner().invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 0 and "1 valid rows, 1 bad" in result.output
    result = CliRunner().invoke(app, ["data", "check", str(path), "--strict"])
    assert result.exit_code != 0 and isinstance(result.exception, PadlmError)
    assert ":2:" in str(result.exception)


def test_split_is_by_prompt_and_stable():
    rows = [PreferenceRow(f"prompt {i % 40}", "p", "a", "b", d, "t")
            for i in range(400) for d in ("P1A",)]
    train, val = split_rows(rows)
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in val})
    assert 0 < len(val) < len(train)
    assert split_rows(rows) == (train, val)


def test_pools_and_hh_conversion():
    prompts = self_instruct_prompts(POOLS)
    assert len(prompts) == 175 + 252
    assert not any("koala" in p.source for p in prompts)
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?\n\nAssistant:"
    assert parse_dialogue(dialogue + " I can't help.")[-1] == {"role": "assistant",
                                                                "content": "I can't help."}
    row = convert_pair({"chosen": dialogue + " I can't help with that.",
                        "rejected": dialogue + " Use a bobby pin."})
    assert row.prompt == [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "how do I pick a lock?"}]
    assert (row.chosen, row.rejected, row.dimension) == (
        "I can't help with that.", "Use a bobby pin.", "harmless")
    assert convert_pair({"chosen": dialogue + " same", "rejected": dialogue + " same"}) is None
    assert validate_row(json.loads(row.to_json())) == []


def test_clean_response_never_ends_mid_word():
    assert clean_response("One two three. Four fiv", cut=True) == "One two three."
    assert clean_response("One. Two three fo", cut=True) == "One. Two three"  # too little left
    assert clean_response("Alpha beta gamma delt", cut=True) == "Alpha beta gamma"
    assert clean_response("  Done.  ", cut=False) == "Done."
    assert is_degenerate("ok") == "empty or too short"
    assert is_degenerate("a b c d a b c d a b c d") == "repetition loop"
    assert is_degenerate("A perfectly normal answer here.") is None


def _build(engine, out, crash_after=None):
    calls = []

    def progress(done, total):
        calls.append(done)
        if crash_after is not None and len(calls) >= crash_after:
            raise KeyboardInterrupt

    config = BuildConfig(out=out, pool_dir=POOLS, limit=3, seed=1, batch_size=2,
                         max_new_tokens=6, axes=("P1", "harmless"), harmless_limit=2)
    return build_dataset(LocalSampler(engine), config, progress)


def test_build_resumes_and_is_deterministic(tiny_engine, tmp_path):
    """Tiny random model: an interrupted build resumes without repeating finished keys,
    and ends with exactly the rows of an uninterrupted build."""
    interrupted = tmp_path / "a.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_engine, interrupted, crash_after=1)
    partial = interrupted.with_name("a.jsonl.done").read_text().splitlines()
    assert len(partial) == 1 + 2  # harmless marker + one prompt's P1A / P1B keys
    _build(tiny_engine, interrupted)
    done = interrupted.with_name("a.jsonl.done").read_text().splitlines()
    assert len(done) == len(set(done)) == 1 + 3 * 2
    fresh = tmp_path / "b.jsonl"
    _build(tiny_engine, fresh)
    assert sorted(interrupted.read_text().splitlines()) == sorted(fresh.read_text().splitlines())
    rows, errors = load_rows(fresh, strict=True)
    assert sum(r.dimension == "harmless" for r in rows) == 2 and not errors
    for row in rows:
        if row.dimension != "harmless":
            assert row.meta["mirror"][1] == {"P1A": "P1B", "P1B": "P1A"}[row.dimension]


def test_prompt_folds_cover_every_prompt_once():
    rows = [PreferenceRow(f"prompt {i}", "p", "a", "b", "P1A", "t") for i in range(60)]
    seen = []
    for index in range(5):
        train, val = split_rows(rows, fold=(index, 5))
        assert len(train) + len(val) == 60
        seen += [r.prompt for r in val]
    assert sorted(seen) == sorted(r.prompt for r in rows)


class FakeTeacher:
    """A sampler whose text is a pure function of (instruction, seed); it refuses the sides
    in ``refuse`` and counts the requests it got."""

    name = "fake-teacher"
    placement = "system"
    engine_name = "fake"

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = refuse
        self.requests: list[SampleRequest] = []

    def sample(self, requests, settings):
        self.requests += requests
        samples = []
        for request in requests:
            # a sampled side is told its goal as the instruction, a rewrite in its content
            told = request.instruction + "\n" + request.messages[-1]["content"]
            side = next((s for s in SIDES if generation_text(s) in told), "neutral")
            text = ("I'm sorry, but I can't assist with that." if side in self.refuse
                    else f"A {side} answer number {request.seed % 997} in a few words.")
            samples.append(Sample(text, 7, False))
        return samples


def _fake_build(out, teacher, **overrides):
    config = BuildConfig(out=out, pool_dir=POOLS, limit=3, seed=2, batch_size=4,
                         axes=("P1", "P3", "sassy"), modes={"P3": "rewrite"},
                         command="padlm data build --test", **overrides)
    return build_dataset(teacher, config)


def test_rewrite_mode_refusals_held_out_axes_and_the_build_record(tmp_path):
    out = tmp_path / "t.jsonl"
    teacher = FakeTeacher(refuse=("P3B",))
    stats = _fake_build(out, teacher)
    rows, _ = load_rows(out, strict=True)
    assert {r.dimension for r in rows} == {"P1A", "P1B", "sassy", "earnest"}  # P3 refused
    assert all(r.meta["sampler"] == "fake-teacher" for r in rows)
    assert all(r.meta.get("held_out") is (True if r.meta["axis"] == "sassy" else None)
               for r in rows)
    assert stats["pairs_dropped"] == {"P3: refusal": 3}
    assert stats["refusal_rate"]["P3B"] == 1.0 and stats["refusal_rate"]["P3A"] == 0.0
    # rewrite mode: one greedy neutral answer per prompt, then a rewrite of it per side
    neutral = [r for r in teacher.requests if r.instruction == NEUTRAL_INSTRUCTION]
    assert len(neutral) == 3 and all(r.temperature == 0.0 for r in neutral)
    rewrites = [r for r in teacher.requests if "Rewrite the answer" in r.messages[0]["content"]]
    assert len(rewrites) == 3 * 2 and "A neutral answer" in rewrites[0].messages[0]["content"]
    # every side of a prompt shares its context up to the side's goal (prefix caching)
    assert {r.instruction for r in rewrites} == {REWRITE_INSTRUCTION}
    first, second = (r.messages[0]["content"] for r in rewrites[:2])
    shared = first.index(generation_text("P3A"))
    assert first[:shared] == second[:shared] and generation_text("P3B") in second[shared:]
    assert len((tmp_path / "t.jsonl.neutral.jsonl").read_text().splitlines()) == 3
    dropped = [json.loads(x) for x in (tmp_path / "t.jsonl.done").read_text().splitlines()]
    assert sum(d.get("dropped") == "refusal" for d in dropped) == 3 * 2
    summary = progress_summary(out)
    assert summary["refusal_rate"]["P3B"] == 1.0 and summary["dropped"]["P3A"] == 3
    assert summary["kept"]["P1A"] == 3 and summary["refusal_rate"]["P1A"] == 0.0
    record = json.loads((tmp_path / "t.build.json").read_text())
    [run] = record["runs"]
    assert run["command"] == "padlm data build --test" and run["finished"]
    assert run["modes"] == {"P1": "sample", "P3": "rewrite", "sassy": "sample"}
    assert run["tokens_per_second"] > 0 and run["generated_tokens"] == 7 * (3 + 3 * 6)
    assert record["held_out_axes"] == ["sassy", "sarcastic"]
    # resuming a finished build asks for nothing and records a second run
    again = FakeTeacher(refuse=("P3B",))
    assert _fake_build(out, again)["rows_written"] == {} and again.requests == []
    assert len(json.loads((tmp_path / "t.build.json").read_text())["runs"]) == 2


def test_a_refused_neutral_answer_drops_its_rewrites_without_sampling_them(tmp_path):
    teacher = FakeTeacher(refuse=("neutral",))
    stats = _fake_build(tmp_path / "t.jsonl", teacher)
    assert stats["pairs_dropped"] == {"P3: neutral answer refused or degenerate": 3}
    assert "P3A" not in stats["refusal_rate"]  # nothing was sampled for it
    summary = progress_summary(tmp_path / "t.jsonl")
    assert summary["dropped"]["P3A"] == 3 and "P3A" not in summary["refusal_rate"]
    assert not any("Rewrite the answer" in r.messages[0]["content"] for r in teacher.requests)


def test_refusals_are_recognised():
    for text in ("I'm sorry, but I can't assist with that.", "I am sorry, I cannot do that.",
                 "I can't help with that request.", "As an AI, I do not have feelings.",
                 "I’m sorry, but I won’t write that."):
        assert is_refusal(text), text
    for text in ("Sorry to hear that! Here is how to fix it.", "I can help: first, ...",
                 "The sky is blue because of Rayleigh scattering."):
        assert not is_refusal(text), text


def test_older_done_sidecars_still_resume(tmp_path):
    out = tmp_path / "old.jsonl"
    (tmp_path / "old.jsonl.done").write_text('["p1", "P1A"]\n{"key": ["p2", "P1B"], '
                                             '"dropped": "refusal"}\n["p3", "P2')
    assert done_keys(out) == {("p1", "P1A"), ("p2", "P1B")}  # the torn last line is ignored


def test_pool_dir_needs_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("PADLM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PadlmError, match=r"no prompt pools in .*--pool-dir"):
        default_pool_dir()
    monkeypatch.chdir(POOLS.parent)
    assert default_pool_dir() == POOLS
    monkeypatch.setenv("PADLM_DATA_DIR", str(POOLS))
    assert default_pool_dir() == POOLS


def test_axes_and_modes_are_checked_before_anything_loads():
    from typer.testing import CliRunner

    from padlm.cli import app

    for args, message in ((["--axes", "P1,nope"], "unknown axis nope"),
                          (["--mode", "P1=paraphrase"], "unknown mode 'paraphrase'"),
                          (["--mode", "P9=rewrite"], "unknown axis 'P9'"),
                          (["--mode", "sometimes"], "use sample, rewrite, auto")):
        result = CliRunner().invoke(app, ["data", "build", "--out", "x.jsonl", *args])
        assert isinstance(result.exception, PadlmError), args
        assert message in str(result.exception)
    assert len(AXES) >= 5 + 8 and set(HELD_OUT_AXES) <= set(AXES)


def test_every_usable_hh_pair_is_kept():
    rows = harmless_rows(POOLS)
    assert len(rows) == 2303  # of 2,312 records; the rest are not clean last-turn pairs
    train, val = split_rows(rows)
    assert {r.prompt_key for r in train}.isdisjoint({r.prompt_key for r in val})
    assert 0.1 < len(val) / len(rows) < 0.2


def test_label_agreement_counts_unusable_pairs_against_a_mode():
    prompt = PoolPrompt("p", "Explain rain.", "t")
    simple, hard = "Rain is water. It falls.", ("Precipitation results from the coalescence "
                                                "of condensed atmospheric water vapour.")

    def pair(texts, reason=None):
        return Pair(prompt, AXES["P1"], "sample", texts, 10, (False, False), reason)

    pairs = [pair((simple, hard)), pair((hard, simple)), pair((simple, hard), "refusal"),
             pair((simple, hard))]
    summary = summarize(pairs)
    assert summary["agreement"] == 0.5 and summary["agreement_usable"] == round(2 / 3, 3)
    assert summary["dropped"] == {"refusal": 1}

    def scores(usable, overall):
        return {"agreement_usable": usable, "agreement": overall}

    by_mode = {"sample": {"P1": scores(0.7, 0.45), "P2": scores(1.0, 0.9),
                          "P3": scores(0.9, 0.9)},
               "rewrite": {"P1": scores(1.0, 0.44), "P2": scores(1.0, 0.7),
                           "P3": scores(0.9, 0.9)}}
    chosen = choose_modes(by_mode)
    # precision first (P1), then yield (P2), then the cheaper mode (P3)
    assert (chosen["P1"], chosen["P2"], chosen["P3"]) == ("rewrite", "sample", "sample")
    assert chosen["format"] == "sample"  # unmeasured: what most measured axes chose
    by_mode["rewrite"]["P3"] = scores(1.0, 0.5)
    assert choose_modes(by_mode)["format"] == "rewrite"


@pytest.mark.slow
def test_endpoint_sampler_against_padlm_serve(default_lm, tmp_path):
    """The OpenAI-endpoint sampler drives a live ``padlm serve`` over loopback: seeded rows
    repeat, a cut response is flagged, and a build through it records the endpoint."""
    from padlm.core.engine import Personalizer
    from padlm.server.app import ServerThread, create_app

    app = create_app(Personalizer(default_lm, persrm="identity"), max_batch_size=4,
                     max_queue=8)
    with ServerThread(app) as server:
        sampler = open_sampler(f"{server.url}/v1")
        assert isinstance(sampler, EndpointSampler) and sampler.name.endswith("#" +
                                                                               sampler.model)
        request = SampleRequest([{"role": "user", "content": "Name a colour."}],
                                generation_text("P2A"), seed=5, temperature=0.7)
        first, second = (sampler.sample([request], SamplingSettings(max_new_tokens=6))[0]
                         for _ in range(2))
        assert first == second and first.text and first.tokens == 6 and first.cut
        stats = build_dataset(sampler, BuildConfig(out=tmp_path / "e.jsonl", pool_dir=POOLS,
                                                   limit=1, axes=("P2",), max_new_tokens=12))
        rows, _ = load_rows(tmp_path / "e.jsonl")
        assert rows and all(r.meta["sampler"] == sampler.name for r in rows)
        assert stats["generated_tokens"] > 0
    with pytest.raises(PadlmError, match="must end in /v1"):
        open_sampler("http://127.0.0.1:9/api")
    with pytest.raises(PadlmError, match="sampler endpoint"):
        open_sampler("http://127.0.0.1:9/v1")  # nothing listens there


def test_bench_sampler_requests_are_the_builds_own():
    """The benchmark decodes a build's sample-mode requests, seeded as the build seeds them."""
    from padlm.bench.sampler import bench_requests
    from padlm.data.build import generation_pool, row_seed

    requests = bench_requests(POOLS, 5, seed=3, temperature=0.7)
    prompts = generation_pool(POOLS, 3, 0.3, limit=3)
    assert len(requests) == 5
    assert [r.messages[0]["content"] for r in requests] == [
        p.prompt for p in prompts for _ in range(2)][:5]
    assert [r.instruction for r in requests[:2]] == [generation_text("P2A"),
                                                      generation_text("P2B")]
    assert requests[1].seed == row_seed(3, prompts[0].id, "P2B")


def test_bench_sampler_ratios_and_table():
    from padlm.bench.sampler import comparison_table, with_ratios

    results = with_ratios([
        {"engine": "hf", "requests": 4, "generated_tokens": 40, "seconds": 4.0,
         "tokens_per_second": 10.0, "startup_seconds": 2.0},
        {"engine": "vllm", "requests": 4, "generated_tokens": 44, "seconds": 1.1,
         "tokens_per_second": 40.0, "startup_seconds": 90.0}])
    assert [r["vs_hf"] for r in results] == [1.0, 4.0]
    last = comparison_table(results).splitlines()[-1]
    assert last == "| vllm | 4 | 44 | 1.1 | 40.0 | 4.00x | 90.0 |"


def test_bench_sampler_on_the_default_model_keeps_the_build_record(tmp_path):
    """`padlm bench sampler --record` adds its comparison to a build record and keeps the
    runs already there (real default model, HF engine)."""
    from typer.testing import CliRunner

    from padlm.cli import app

    out = tmp_path / "t.jsonl"
    (tmp_path / "t.build.json").write_text(json.dumps({"runs": [{"engine": "hf"}]}))
    result = CliRunner().invoke(app, [
        "bench", "sampler", "--sampler", "default", "--engine", "hf", "--requests", "3",
        "--max-new-tokens", "4", "--record", str(out), "--pool-dir", str(POOLS), "--json"])
    assert result.exit_code == 0, result.output
    [timed] = json.loads(result.stdout)
    assert timed["engine"] == "hf" and timed["requests"] == 3 and timed["vs_hf"] == 1.0
    assert 0 < timed["generated_tokens"] <= 3 * 4 and timed["tokens_per_second"] > 0
    record = json.loads((tmp_path / "t.build.json").read_text())
    assert record["runs"] == [{"engine": "hf"}]
    comparison = record["engine_comparison"]
    assert comparison["engines"] == [timed] and comparison["max_new_tokens"] == 4
    assert comparison["command"].startswith("padlm ")
    bad = CliRunner().invoke(app, ["bench", "sampler", "--sampler", "http://x/v1"])
    assert isinstance(bad.exception, PadlmError) and "bench serve --url" in str(bad.exception)
