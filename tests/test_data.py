"""Preference data: row validation with line numbers, splits, pools, HH conversion, build resume."""

from __future__ import annotations

import json

import pytest

from padlm.data.build import BuildConfig, build_dataset, clean_response, is_degenerate
from padlm.data.hh import convert_pair
from padlm.data.pools import default_pool_dir, parse_dialogue, self_instruct_prompts
from padlm.data.schema import PreferenceRow, load_rows, validate_row
from padlm.data.splits import split_rows
from padlm.errors import PadlmError

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

    from padlm.cli import _register_subcommands, app

    _register_subcommands()
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
    prompts = self_instruct_prompts(default_pool_dir())
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

    config = BuildConfig(out=out, pool_dir=default_pool_dir(), limit=3, seed=1, batch_size=2,
                         max_new_tokens=6, axes=("P1", "harmless"), harmless_limit=2)
    return build_dataset(engine, config, progress)


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
