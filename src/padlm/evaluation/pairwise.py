"""The pairwise LLM judge over an eval run: every strategy's response against ``base``'s on
the same prompt, as a win rate with a bootstrap interval per summary row.

It lives with the harness, not with the judge (:mod:`padlm.judges.llm`), because it reads the
harness's files; the judge itself only knows prompts, preferences and texts.
"""

from __future__ import annotations

import json
from pathlib import Path

from padlm.atomic import write_json_atomic
from padlm.errors import PadlmError
from padlm.evaluation.harness import BASE, GENERATIONS, SUMMARY, EvalPlan, load_benchmark
from padlm.evaluation.stats import bootstrap_ci
from padlm.judges.llm import LLMJudge
from padlm.preferences import PSOUPS
from padlm.records import read_jsonl


def judge_summary(llm: LLMJudge, summary: dict, out: Path, plan: EvalPlan) -> dict:
    """Add ``llm_win_rate`` (+ CI) to every single-preference row of ``summary``."""
    prompts = {i["id"]: i["prompt"] for i in load_benchmark(plan.benchmark, plan.limit)}
    return _judge_rows(llm, summary["rows"], _records(out, summary, prompts), prompts)


def judge_directory(llm: LLMJudge, out: Path) -> dict:
    """Judge a finished ``padlm eval`` directory; writes ``llm_judge.json``."""
    if not (out / SUMMARY).exists():
        raise PadlmError(f"{out / SUMMARY} does not exist: run `padlm eval` first")
    summary = json.loads((out / SUMMARY).read_text())
    prompts = {i["id"]: i["prompt"] for i in load_benchmark(summary["benchmark"],
                                                            summary["limit"])}
    rows = [r for r in summary["rows"] if r["preference"] in PSOUPS]
    result = _judge_rows(llm, rows, _records(out, summary, prompts), prompts)
    result["judge"] = {"url": llm.base_url, "model": llm.model}
    write_json_atomic(out / "llm_judge.json", result)
    return result


def _records(out: Path, summary: dict, prompts: dict[str, str]) -> list[dict]:
    """The run's generations made with the summary's decoding settings, for its prompts."""
    cfg = summary["generation"]
    return [r for r in read_jsonl(out / GENERATIONS) if r["config"] == cfg
            and r["id"] in prompts]


def _judge_rows(llm: LLMJudge, rows: list[dict], records: list[dict],
                prompts: dict[str, str]) -> dict:
    base = {r["id"]: r["text"] for r in records if r["strategy"] == BASE}
    cache = llm.load_cache()
    for row in rows:
        if row["strategy"] == BASE or "combination" in row:
            continue
        mine = [r for r in records if r["preference"] == row["preference"]
                and r["label"] == row["label"] and r["id"] in base]
        if not mine:
            continue
        verdicts = llm.compare_many([(prompts[r["id"]], row["preference"], r["text"],
                                      base[r["id"]]) for r in mine], cache)
        lo, hi = bootstrap_ci(verdicts)
        row["llm_win_rate"] = round(sum(verdicts) / len(verdicts), 4)
        row["llm_win_rate_ci"] = [round(lo, 4), round(hi, 4)]
        row["llm_judge"] = llm.model
    return {"rows": [{k: r.get(k) for k in ("label", "preference", "llm_win_rate",
                                             "llm_win_rate_ci")}
                     for r in rows if "llm_win_rate" in r]}
