"""The command line as users meet it: real subprocesses, real exit codes, no tracebacks."""

import json
import subprocess
import sys

import pytest

PADLM = [sys.executable, "-c", "from padlm.cli import main; main()"]


def run_all(argument_lists, cwd=None):
    """Start every command at once (each pays the import cost) and collect the results."""
    processes = [subprocess.Popen(PADLM + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=cwd) for args in argument_lists]
    return [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in processes]


def test_bad_input_gives_one_line_error_and_exit_2(tmp_path):
    unreadable = tmp_path / "prompts.json"
    unreadable.write_text("[not json")
    judge = ["eval", "llm-judge", str(tmp_path), "--judge-url", "http://127.0.0.1:9/v1",
             "--judge-model", "judge"]
    cases = {
        "the prompt is empty": ["generate", ""],
        "unknown strategy": ["generate", "hi", "--strategy", "magic"],
        "top-k must be >= 1": ["generate", "hi", "--top-k", "0"],
        "weight must be a number within": ["generate", "hi", "--weight", "inf"],
        "model path": ["generate", "hi", "--model", str(tmp_path / "missing-model")],
        "cannot read prompts file": ["generate", "--prompts-file", str(tmp_path / "nope.txt")],
        "is not valid JSON": ["generate", "--prompts-file", str(unreadable)],
        "unknown preference id": ["generate", "hi", "--preference", "P9Z"],
        # refused before any model loads: the model named here does not exist
        "unknown preference id P9Z;": ["generate", "hi", "--preference", "P1A+P9Z",
                                       "--model", str(tmp_path / "missing-model")],
        "unknown scorer 'magic'": ["generate", "hi", "--strategy", "args", "--scorer", "magic"],
        "guide alignment must be one of": ["generate", "hi", "--guide-alignment", "bytes",
                                           "--model", str(tmp_path / "missing-model")],
        "not the free-text preference 'be brief': use preset ids, or --scorer persrm": [
            "generate", "hi", "--strategy", "args", "--preference", "be brief"],
        "unknown bench strategy": ["bench", "--strategies", "base,warp"],
        "prompt does not": ["generate", "hi", "--strategy", "prompt", "--echo-guard"],
        "--judge-samples must be at least 1": judge + ["--judge-no-ties", "--judge-samples", "0"],
        "--judge-concurrency must be at least 1": judge + ["--judge-concurrency", "0"],
    }
    results = run_all(list(cases.values()))
    for (expected, args), (code, _stdout, stderr) in zip(cases.items(), results, strict=True):
        assert code == 2, (args, stderr)
        assert "Traceback" not in stderr, args
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], (args, stderr)


@pytest.mark.slow
def test_generate_json_and_prompts_file(tmp_path, default_lm):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Say hi."}\n{"id": "b", "prompt": "Name a fruit."}\n')
    (single, out_single, err_single), (batch, out_batch, err_batch) = run_all([
        ["generate", "Say hi.", "--preference", "P2A", "--json", "--max-new-tokens", "8"],
        ["generate", "--prompts-file", str(prompts), "--strategy", "linear-alignment",
         "--preference", "P3A", "--max-new-tokens", "8", "--batch-size", "2"],
    ])
    assert single == 0, err_single
    record = json.loads(out_single)
    for key in ["text", "strategy", "preference", "model", "persrm", "new_tokens", "seconds",
                "tokens_per_second"]:
        assert key in record
    assert record["model"] == "SmolLM2-135M-Instruct" and 0 < record["new_tokens"] <= 8
    assert batch == 0, err_batch
    rows = [json.loads(line) for line in out_batch.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert all(r["strategy"] == "linear-alignment" for r in rows)


def test_prompt_file_formats(tmp_path):
    from padlm.records import load_prompts

    (tmp_path / "a.json").write_text(json.dumps(["one", {"id": "x", "prompt": "two"}]))
    (tmp_path / "b.txt").write_text("first line\n\nsecond line\n")
    assert load_prompts(tmp_path / "a.json") == [{"id": "0", "prompt": "one"},
                                                 {"id": "x", "prompt": "two"}]
    assert [p["prompt"] for p in load_prompts(tmp_path / "b.txt")] == ["first line",
                                                                       "second line"]
