"""``padlm bench serve --profiles``: users who rate every answer, and what that costs.

The levels run against the tiny model's in-process server (features read off the text, so no
reward model loads); the command itself, starting its own servers with and without profiles,
runs on the real default model (slow).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from padlm.bench.serve import BENCH_USER, run_level, runs_report
from padlm.cli import app
from padlm.errors import PadlmError
from padlm.server.gate import PUBLIC_TENANT

PADLM = str(Path(sys.executable).parent / "padlm")


@pytest.fixture
def profiles(text_profiles):
    return text_profiles


def test_each_client_is_a_user_who_rates_every_answer(serve, profiles):
    server, _ = serve(profiles=profiles, max_batch_size=4)
    row = asyncio.run(run_level(server.url, 2, 4, 3, "pad", 60, profiles=True))
    assert row["errors"] == 0 and row["requests"] == 4 and row["tokens"] == 12
    assert row["feedback"] == 4 and row["feedback_errors"] == 0
    assert 0 < row["p50_feedback_s"] <= row["p95_feedback_s"]
    assert row["first_feedback_error"] is None
    learned = [profiles.show(PUBLIC_TENANT, f"{BENCH_USER}{c}") for c in range(2)]
    assert sum(p["choices"] for p in learned) == 4  # one thumb per answer, on its user
    assert all(p["choices"] for p in learned)  # both clients asked before rating again


def test_feedback_the_server_refuses_counts_as_errors(serve):
    server, _ = serve(max_batch_size=4)  # no profiles: it answers, but learns nothing
    row = asyncio.run(run_level(server.url, 2, 2, 2, "pad", 60, profiles=True))
    assert row["errors"] == 0 and row["feedback"] == 2 and row["feedback_errors"] == 2
    assert row["first_feedback_error"].startswith("404") and \
        "keeps no profiles" in row["first_feedback_error"]
    plain = asyncio.run(run_level(server.url, 1, 1, 2, "pad", 60))
    assert "feedback" not in plain


def test_profiles_is_refused_where_it_cannot_be_measured():
    runner = CliRunner()
    for args, message in (
            (["--profiles", "both", "--url", "http://127.0.0.1:9"], "not with --url"),
            (["--profiles", "both", "--engine", "hf,vllm"], "several engines"),
            (["--profiles", "on", "--strategy", "mix"], "needs a stated preference"),
            (["--profiles", "yes"], "off, on or both")):
        bad = runner.invoke(app, ["bench", "serve", *args])
        assert isinstance(bad.exception, PadlmError) and message in str(bad.exception), args


def test_the_report_puts_the_profile_run_beside_the_plain_one():
    def run(rate, profiles):
        level = {"clients": 4, "requests": 8, "errors": 0, "tokens_per_second": rate,
                 "p50_latency_s": 1.0, "p95_latency_s": 2.0, "p50_ttft_s": 0.1,
                 "p95_ttft_s": 0.2, "p95_inter_token_s": 0.05}
        if profiles:
            level.update(feedback=8, feedback_errors=0, p50_feedback_s=0.03,
                         p95_feedback_s=0.09)
        return {"profiles": profiles, "levels": [level]}

    report = runs_report({"hf": run(40.0, False), "hf+profiles": run(30.0, True)})
    own, comparison = report.split("\n\n| clients | hf tokens/s")
    assert own.startswith("hf+profiles:\n\n| clients | requests | errors")
    assert own.splitlines()[2].endswith(
        "| feedback | feedback errors | p50 feedback s | p95 feedback s |")
    assert own.splitlines()[4].endswith("| 8 | 0 | 0.03 | 0.09 |")
    assert comparison.splitlines()[0].endswith("| hf+profiles / hf |")
    assert comparison.splitlines()[2] == "| 4 | 40.0 | 1.0 | 30.0 | 1.0 | 0.75x |"
    # one run without profiles: the table it always had
    assert "feedback" not in runs_report({"hf": run(40.0, False)})


@pytest.mark.slow
def test_bench_serve_profiles_both_end_to_end(tmp_path):
    """The real command: a server without profiles, then one with a fresh store and the
    shipped reward models; the same levels, the profile run's feedback all learned from."""
    done = subprocess.run([PADLM, "bench", "serve", "--clients", "2", "--requests", "2",
                           "--max-tokens", "3", "--persrm", "identity", "--profiles", "both",
                           "--json", "--record", str(tmp_path / "serve.json")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert list(result) == ["hf", "hf+profiles"]
    assert json.loads((tmp_path / "serve.json").read_text())["results"] == result
    plain, profiled = (result[name]["levels"][0] for name in result)
    assert result["hf"]["profiles"] is False and "feedback" not in plain
    assert result["hf+profiles"]["profiles"] is True
    for level in (plain, profiled):
        assert level["errors"] == 0 and level["tokens"] == 6 and level["tokens_per_second"] > 0
    assert profiled["feedback"] == 2 and profiled["feedback_errors"] == 0, profiled
    assert profiled["p50_feedback_s"] > 0
