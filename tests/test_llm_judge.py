"""The optional LLM judge against a local stub that speaks the OpenAI chat API on loopback.

The stub always prefers the response containing the word "banana": with the order
randomised, the judge must still credit the right side every time, cache every verdict, and
the official ``openai`` client must accept the stub (so the stub really is OpenAI-shaped).
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from padlm.core.config import GenerationConfig
from padlm.core.engine import Personalizer
from padlm.core.persrm import PersonalizedRewardModel
from padlm.errors import PadlmError
from padlm.evaluation import harness
from padlm.evaluation.pairwise import judge_directory, pooled, rule_agreement, same_side
from padlm.judges.llm import (
    LLMJudge,
    build_messages,
    first_letter_share,
    method_score,
    parse_verdict,
)
from padlm.records import read_jsonl


class StubOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []
    reply_override: str | None = None
    fail_on: str | None = None  # a text whose questions get a 500

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubOpenAI.requests.append({"path": self.path, "body": body,
                                    "auth": self.headers.get("Authorization")})
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        if StubOpenAI.fail_on and StubOpenAI.fail_on in user:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        a = user.split("[Response A]")[1].split("[Response B]")[0]
        b = user.split("[Response B]")[1]
        verdict = "TIE" if ("banana" in a) == ("banana" in b) else ("A" if "banana" in a
                                                                      else "B")
        content = StubOpenAI.reply_override or verdict
        # sampled votes: the first of every three is the letter shown first, the rest honest
        contents = ([content] if body.get("n", 1) == 1 else
                    ["A" if i % 3 == 0 else content for i in range(body["n"])])
        # log-probabilities: a judge that always says "A", yet leans to the right answer
        lean = {"A": 0.9, "B": 0.6, "TIE": 0.75}[verdict]
        top = [{"token": "A", "logprob": math.log(lean)},
               {"token": " b", "logprob": math.log(1 - lean)}]
        payload = json.dumps({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": i, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": c},
                         "logprobs": ({"content": [{"token": "A", "logprob": top[0]["logprob"],
                                                    "top_logprobs": top}]}
                                      if body.get("logprobs") else None)}
                        for i, c in enumerate(contents)],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def stub_url():
    StubOpenAI.requests = []
    StubOpenAI.reply_override = None
    StubOpenAI.fail_on = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_stub_speaks_openai_for_the_official_client(stub_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stub_url, api_key="sk-test", max_retries=0)
    messages = build_messages("q", "P3A", "banana split", "plain")
    reply = client.chat.completions.create(model="judge", messages=messages)
    assert reply.choices[0].message.content == "A"
    ours = LLMJudge(stub_url, "judge", "sk-test")
    ours._ask(messages)
    theirs, mine = StubOpenAI.requests
    # we send what the official client sends: same path, bearer key, model and messages
    assert mine["path"] == theirs["path"] == "/v1/chat/completions"
    assert mine["auth"] == theirs["auth"] == "Bearer sk-test"
    assert mine["body"]["messages"] == theirs["body"]["messages"]


def test_verdicts_undo_random_order_and_are_cached(stub_url, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    cache = tmp_path / "cache.jsonl"
    judge = LLMJudge.from_env(stub_url, "judge", "JUDGE_KEY", cache=cache)
    items = [(f"prompt {i}", "P3A", f"method says banana {i}", f"base says hello {i}")
             for i in range(12)]
    items += [("p", "P2A", "same words", "same words"),
              ("q", "P2A", "no fruit", "a banana")]
    verdicts = judge.compare_many(items)
    assert verdicts == [1.0] * 12 + [0.5, 0.0]
    shown_first = [r["body"]["messages"][-1]["content"].split("[Response B]")[0]
                   for r in StubOpenAI.requests]
    method_first = sum("method says" in text for text in shown_first)
    assert 0 < method_first < 12  # the order really is randomised
    assert all(r["auth"] == "Bearer sk-secret" for r in StubOpenAI.requests)
    assert "[Criteria]" in StubOpenAI.requests[0]["body"]["messages"][-1]["content"]
    # a second judge on the same cache asks nothing and agrees
    count = len(StubOpenAI.requests)
    again = LLMJudge.from_env(stub_url, "judge", "JUDGE_KEY", cache=cache)
    assert again.compare_many(items) == verdicts
    assert len(StubOpenAI.requests) == count


def test_unparseable_reply_is_a_tie_and_errors_are_clear(stub_url):
    StubOpenAI.reply_override = "I cannot decide."
    assert LLMJudge(stub_url, "judge").compare("q", "P1A", "x banana", "y") == 0.5
    assert parse_verdict("b") == "B" and parse_verdict(" tie.") == "TIE"
    assert parse_verdict("Both are a bit long; B wins") == "B"
    assert parse_verdict("no idea") is None
    with pytest.raises(PadlmError, match="answered 404"):
        LLMJudge(stub_url.replace("/v1", "/nope"), "judge").compare("q", "P1A", "a", "b")
    with pytest.raises(PadlmError, match="http"):
        LLMJudge.from_env("localhost:1", "judge")


def test_judge_a_finished_eval_directory(stub_url, tiny_engine, tmp_path):
    """`padlm eval llm-judge DIR`: every strategy row vs base gets an LLM win rate + CI."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nName a fruit.\nWhat is 2+2?\n")
    plan = harness.EvalPlan(benchmark=str(prompts), preferences=["P2A"],
                            strategies=["base", "prompt"], config=GenerationConfig(
                                max_new_tokens=4), batch_size=3)
    harness.run(tiny_engine, plan, tmp_path / "run", progress=False)
    result = judge_directory(LLMJudge(stub_url, "judge", cache=tmp_path / "run" / "c.jsonl"),
                             tmp_path / "run")
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"prompt"}
    # neither side says "banana": the stub answers TIE for every prompt
    assert rows["prompt"]["llm_win_rate"] == 0.5
    assert len(StubOpenAI.requests) == 3
    assert (tmp_path / "run" / "llm_judge.json").exists()


def test_the_judge_reads_only_the_responses_the_summary_measured(stub_url, tiny_lm, tmp_path):
    """A directory keeps an earlier PersRM's responses under other keys: judging a rerun with
    a new PersRM must not count them too."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nName a fruit.\nWhat is 2+2?\n")
    plan = harness.EvalPlan(benchmark=str(prompts), preferences=["P2A"],
                            strategies=["base", "pad"], config=GenerationConfig(
                                max_new_tokens=4), batch_size=3)
    out = tmp_path / "run"
    harness.run(Personalizer(tiny_lm, persrm="identity"), plan, out, progress=False)
    retrained = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    torch.manual_seed(3)
    with torch.no_grad():
        retrained.head.weight.add_(0.5 * torch.randn_like(retrained.head.weight))
    harness.run(Personalizer(tiny_lm, persrm=retrained), plan, out, progress=False)
    assert len(read_jsonl(out / "generations.jsonl")) == 3 + 3 + 3  # base, both PersRMs' pad
    result = judge_directory(LLMJudge(stub_url, "judge"), out, both_orders=True)
    (overall,) = result["pooled"]
    assert overall["pairs"] == 3 and overall["prompts"] == 3


def test_both_orders_cancel_and_measure_position_bias(stub_url, tmp_path):
    judge = LLMJudge(stub_url, "judge", cache=tmp_path / "cache.jsonl")
    items = [("q", "P3A", "pad says banana", "other says hello"),
             ("r", "P3A", "pad says hello", "other says banana")]
    assert judge.compare_both_orders(items) == [(1.0, 1.0), (0.0, 0.0)]
    assert len(StubOpenAI.requests) == 4  # each pair asked once per order
    StubOpenAI.reply_override = "A"  # a judge that always picks the first response shown
    biased = LLMJudge(stub_url, "other-judge")
    assert biased.compare_both_orders(items) == [(1.0, 0.0), (1.0, 0.0)]
    # the random-order judge would have credited whichever side it happened to show first
    assert set(biased.compare_many(items * 6)) <= {0.0, 1.0}


def test_concurrent_questions_agree_with_serial_ones_and_resume_after_a_failure(stub_url,
                                                                               tmp_path):
    items = [(f"question {i}", "P3A", "pad says " + ("banana" if i % 3 else "hello"),
              "other says " + ("hello" if i % 3 else "banana")) for i in range(12)]
    serial = LLMJudge(stub_url, "judge").compare_both_orders(items)
    assert serial == [((1.0, 1.0) if i % 3 else (0.0, 0.0)) for i in range(12)]
    cache = tmp_path / "cache.jsonl"
    StubOpenAI.requests = []
    StubOpenAI.fail_on = "question 7\n"
    with pytest.raises(PadlmError, match="answered 500"):
        LLMJudge(stub_url, "judge", cache=cache, concurrency=4).compare_both_orders(items)
    answered = [r for r in StubOpenAI.requests
                if "question 7\n" not in r["body"]["messages"][-1]["content"]]
    # every answer that arrived is on disk, the failed question is not
    assert len(read_jsonl(cache)) == len(answered) < 24
    StubOpenAI.requests = []
    StubOpenAI.fail_on = None
    resumed = LLMJudge(stub_url, "judge", cache=cache, concurrency=4)
    assert resumed.compare_both_orders(items) == serial
    assert len(StubOpenAI.requests) == 24 - len(answered)  # only the unanswered questions
    with pytest.raises(PadlmError, match="at least 1"):
        LLMJudge.from_env(stub_url, "judge", concurrency=0)


def test_a_forced_choice_judge_offers_no_tie_and_asks_afresh(stub_url, tmp_path):
    cache = tmp_path / "cache.jsonl"
    items = [("q", "P3A", "pad says banana", "other says hello")]
    assert LLMJudge(stub_url, "judge", cache=cache).compare_both_orders(items) == [(1.0, 1.0)]
    forced = LLMJudge.from_env(stub_url, "judge", cache=cache, ties=False)
    assert forced.compare_both_orders(items) == [(1.0, 1.0)]
    assert len(StubOpenAI.requests) == 4  # another conversation is another question
    system, user = StubOpenAI.requests[-1]["body"]["messages"]
    assert "TIE" not in system["content"] + user["content"]
    assert user["content"].endswith("Reply A or B.")
    assert StubOpenAI.requests[0]["body"]["messages"][1]["content"].endswith(
        "Reply A, B or TIE.")


def test_sampled_votes_give_a_graded_verdict(stub_url, tmp_path):
    judge = LLMJudge.from_env(stub_url, "judge", cache=tmp_path / "c.jsonl", samples=6)
    items = [("q", "P3A", "pad says banana", "other says hello")]
    # shown first: 6 of 6 votes for the method; shown second: 4 of 6 (2 go to position A)
    assert judge.compare_both_orders(items) == [(1.0, 4 / 6)]
    body = StubOpenAI.requests[-1]["body"]
    assert body["n"] == 6 and body["temperature"] == 1.0 and body["seed"] == 0
    assert len(StubOpenAI.requests) == 2
    assert LLMJudge(stub_url, "judge", cache=tmp_path / "c.jsonl", samples=6
                    ).compare_both_orders(items) == [(1.0, 4 / 6)]
    assert len(StubOpenAI.requests) == 2  # cached, votes and all
    assert method_score("A,B,TIE,A", True) == 0.625
    assert method_score("A,B,TIE,A", False) == 0.375
    with pytest.raises(PadlmError, match="--judge-samples must be at least 1"):
        LLMJudge.from_env(stub_url, "judge", samples=0)


def test_log_probabilities_cancel_a_judge_that_always_answers_the_same_letter(stub_url,
                                                                               tmp_path):
    judge = LLMJudge.from_env(stub_url, "judge", cache=tmp_path / "c.jsonl", logprobs=True)
    items = [("q", "P3A", "pad says banana", "other says hello"),
             ("r", "P3A", "pad says hello", "other says banana")]
    # P(A) is 0.9 when A is right and 0.6 when B is: the argmax is always A, the shares differ
    ((first, second), (third, fourth)) = judge.compare_both_orders(items)
    assert (first, second) == (pytest.approx(0.9), pytest.approx(0.4))
    assert (third, fourth) == (pytest.approx(0.6), pytest.approx(0.1))
    assert (first + second) / 2 > 0.5 > (third + fourth) / 2
    body = StubOpenAI.requests[-1]["body"]
    assert body["logprobs"] is True and body["max_tokens"] == 1 and body["top_logprobs"] == 20
    assert first_letter_share([{"token": " A", "logprob": math.log(0.3)},
                               {"token": "a", "logprob": math.log(0.1)},
                               {"token": "B", "logprob": math.log(0.4)},
                               {"token": "TIE", "logprob": math.log(0.2)}]) == pytest.approx(0.5)
    assert first_letter_share([{"token": "Sure", "logprob": 0.0}]) is None
    assert method_score("p=0.25", True) == 0.25 and method_score("p=0.25", False) == 0.75
    with pytest.raises(PadlmError, match="drop --judge-samples"):
        LLMJudge.from_env(stub_url, "judge", samples=4, logprobs=True)


def test_position_consistency_is_favouring_the_same_response_in_both_orders():
    assert same_side(1.0, 1.0) and same_side(0.0, 0.0) and same_side(0.5, 0.5)
    assert same_side(0.75, 0.625) and same_side(0.25, 0.0)
    assert not same_side(1.0, 0.5) and not same_side(0.75, 0.25) and not same_side(0.5, 0.0)


def test_rule_agreement_counts_only_pairs_both_judges_decide():
    verdicts = [1.0, 0.0, 0.75, 0.5, 1.0, 0.0]
    gaps = [2.0, 1.0, 0.5, 3.0, 0.0, None]
    # decided by both: (1.0, 2.0) agree, (0.0, 1.0) disagree, (0.75, 0.5) agree
    assert rule_agreement(verdicts, gaps) == (round(2 / 3, 4), 3)
    assert rule_agreement([0.5], [1.0]) == (None, 0)


def test_pooled_win_rate_resamples_prompts_not_pairs():
    pairs = [("p1", 1.0, 2.0, True), ("p1", 0.5, -1.0, False),
             ("p2", 0.0, -3.0, True), ("p2", 1.0, None, True)]
    row = pooled("pad", "linear-alignment", pairs)
    assert row["llm_win_rate"] == 0.625 and row["pairs"] == 4 and row["prompts"] == 2
    # two prompt means, 0.75 and 0.5: every resample's mean lies between them
    assert row["llm_win_rate_ci"][0] >= 0.5 and row["llm_win_rate_ci"][1] <= 0.75
    assert row["llm_position_consistency"] == 0.75
    # decided by both: (1.0, +2) agree, (0.0, -3) agree; 0.5 is undecided, None unscored
    assert (row["llm_rule_agreement"], row["llm_rule_agreement_pairs"]) == (1.0, 2)
    assert pooled("pad", "base", [("p1", 1.0, None, None)])["llm_position_consistency"] is None


def test_judge_one_strategy_against_another_in_both_orders(stub_url, tiny_engine, tmp_path):
    """`padlm eval llm-judge DIR --against prompt --labels linear-alignment --both-orders`."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nName a fruit.\nWhat is 2+2?\n")
    plan = harness.EvalPlan(benchmark=str(prompts), preferences=["P2A", "P3B"],
                            strategies=["base", "prompt", "linear-alignment"],
                            config=GenerationConfig(max_new_tokens=4), batch_size=3)
    harness.run(tiny_engine, plan, tmp_path / "run", progress=False)
    judge = LLMJudge(stub_url, "judge", cache=tmp_path / "run" / "c.jsonl")
    with pytest.raises(PadlmError, match="no strategy labelled nope"):
        judge_directory(judge, tmp_path / "run", against="nope")
    result = judge_directory(judge, tmp_path / "run", against="prompt",
                             labels=["linear-alignment"], both_orders=True)
    rows = {(r["label"], r["preference"]): r for r in result["rows"]}
    assert set(rows) == {("linear-alignment", "P2A"), ("linear-alignment", "P3B")}
    for row in rows.values():  # no "banana" anywhere: a tie in both orders, every time
        assert row["llm_against"] == "prompt"
        assert row["llm_win_rate"] == 0.5 and row["llm_position_consistency"] == 1.0
        assert row["llm_rule_agreement"] is None and row["llm_rule_agreement_pairs"] == 0
    asked = [r["body"]["messages"][-1]["content"] for r in StubOpenAI.requests]
    # 2 preferences x 3 prompts x 2 orders, each distinct question asked once (the tiny
    # model's responses can coincide, and then both orders are one question)
    assert len(asked) == len(set(asked)) and 6 <= len(asked) <= 12
    assert result["judge"]["orders"] == "both"
    (overall,) = result["pooled"]  # both preferences' pairs together
    assert overall["label"] == "linear-alignment" and overall["pairs"] == 6
    assert overall["prompts"] == 3 and overall["llm_win_rate"] == 0.5
    assert (tmp_path / "run" / "llm_judge_vs_prompt.json").exists()
