"""``padlm profile`` and ``padlm eval feedback`` as users meet them: real subprocesses, a
real SQLite store, the real default model writing a profile from a history."""

from __future__ import annotations

import json
import subprocess
import sys

from padlm.profiles.features import parse_axes
from padlm.profiles.service import ProfileService
from padlm.profiles.store import open_store

PADLM = [sys.executable, "-c", "from padlm.cli import main; main()"]


def padlm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*PADLM, *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def test_profile_commands_read_learn_and_forget(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    service = ProfileService(open_store(url), features=lambda prompts, texts: [
        [0.0, -len(t.split()) / 10, t.count("!")] for t in texts])
    service.remember("public", "alice", "chatcmpl-x", ["q", "q"], ["Hi! Fun!", "Noted."])
    service.store.close()
    store = ["--profiles", url, "--tenant", "public"]
    chose = padlm("profile", "choose", "--user", "alice", "--chosen", "chatcmpl-x:0",
                  "--rejected", "chatcmpl-x:1", *store)
    assert chose.returncode == 0, chose.stderr
    assert json.loads(chose.stdout)["axes"]["P3"]["p_side_a"] > 0.5
    shown = json.loads(padlm("profile", "show", "--user", "alice", *store).stdout)
    assert shown["choices"] == 1 and "friendly" in shown["preference"]
    exported = json.loads(padlm("profile", "export", "--user", "alice", *store).stdout)
    assert [e["kind"] for e in exported["events"]] == ["choice"]
    reset = json.loads(padlm("profile", "reset", "--user", "alice", *store).stdout)
    assert reset["choices"] == 0
    deleted = json.loads(padlm("profile", "delete", "--user", "alice", *store).stdout)
    assert deleted["deleted"] is True
    # the local tenant never saw alice
    assert json.loads(padlm("profile", "show", "--user", "alice", "--profiles", url
                            ).stdout)["version"] == 0


def test_profile_mistakes_are_one_line_errors(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    # a profile learned over a free-text axis, read by a command that learns P1-P3 only
    wide = ProfileService(open_store(url), features=lambda prompts, texts: [[0.0] * 4] * len(
        texts), axes=parse_axes("P1,P2,P3,format"))
    wide.set_text("local", "wide", "Use lists.")
    wide.store.close()
    cases = {
        "no response chatcmpl-nope[0] to learn from": [
            "profile", "choose", "--user", "a", "--chosen", "chatcmpl-nope", "--rejected",
            "chatcmpl-nope:1", "--profiles", url],
        "postgresql://": ["profile", "show", "--user", "a", "--profiles", "mysql://x/y"],
        "user must be a non-empty string": ["profile", "show", "--user", " ",
                                            "--profiles", url],
        "cannot read --messages": ["profile", "from-history", "--user", "a", "--messages",
                                   str(tmp_path / "missing.json"), "--profiles", url],
        "unknown profile axis bogus": ["profile", "show", "--user", "a", "--profiles", url,
                                       "--profile-axes", "P1,bogus"],
        "this profile has learned axes format": [
            "profile", "show", "--user", "wide", "--profiles", url],
        "held out of training": ["train", "rewards", "--dimensions", "bullets,sassy",
                                 "--out", str(tmp_path / "r")],
        "--checkpoints must lie in 0..--rounds": [
            "eval", "feedback", "--out", str(tmp_path / "f"), "--rounds", "4",
            "--checkpoints", "0,8", "--model", str(tmp_path / "missing-model")],
    }
    for expected, args in cases.items():
        result = padlm(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, result.stderr)
        assert "Traceback" not in result.stderr


def test_from_history_writes_a_profile_text_with_the_real_model(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    messages = tmp_path / "messages.jsonl"
    messages.write_text("\n".join(json.dumps(m) for m in [
        {"role": "user", "content": "explain like im 5 pls, short!!"},
        {"role": "assistant", "content": "Sure!"},
        {"role": "user", "content": "what is a star? keep it simple and fun :)"},
    ]))
    result = padlm("profile", "from-history", "--user", "kid", "--messages", str(messages),
                   "--model", "default", "--profiles", url)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["text"] and len(body["text"].split()) >= 3
    assert body["preference"] == body["text"]  # no choices yet: the text alone
    store = open_store(url)
    assert store.get("local", "kid").text == body["text"]
    store.close()


def test_train_rewards_fits_heads_that_rank_held_out_pairs(tmp_path):
    """``padlm train rewards`` on the teacher data's format pairs: real MiniLM, real pairs;
    the heads rank the validation split's pairs well above chance and load as profile
    features."""
    data = tmp_path / "pairs.jsonl"
    with open("data/teacher_pairs.jsonl", encoding="utf-8") as source:
        rows = [line for line in source if json.loads(line)["dimension"] in ("bullets", "prose")]
    data.write_text("".join(rows), encoding="utf-8")
    out = tmp_path / "heads"
    result = padlm("train", "rewards", "--data", str(data), "--dimensions", "bullets,prose",
                   "--out", str(out), "--threads", "2")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "rewards.json").read_text("utf-8"))
    assert record["command"].startswith("padlm train rewards")
    for side in ("bullets", "prose"):
        assert record["metrics"][side]["heldout_accuracy"] > 0.75, record
    from padlm.orchestration.rewards import DimensionRewards

    heads = DimensionRewards.load(out)
    listed = "- red apples\n- yellow bananas\n- green grapes"
    prose = "Apples are red, bananas are yellow, and grapes are green."
    scores = heads.scores(["Name three fruits and their colours."] * 2, [listed, prose])
    bullets = heads.dimensions.index("bullets")
    assert scores[0, bullets] > scores[1, bullets]
