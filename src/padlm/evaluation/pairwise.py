"""The pairwise LLM judge over an eval run: every strategy's response against ``base``'s (or
another strategy's) on the same prompt, as a win rate with a bootstrap interval per summary
row, and how often it agrees with the row's rule judge where both pick a side.

It lives with the harness, not with the judge (:mod:`padlm.judges.llm`), because it reads the
harness's files; the judge itself only knows prompts, preferences and texts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from padlm.atomic import write_json_atomic
from padlm.core.preferences import PSOUPS
from padlm.errors import PadlmError
from padlm.evaluation.harness import (
    BASE,
    GENERATIONS,
    SUMMARY,
    EvalPlan,
    load_benchmark,
    measured_records,
    read_scores,
    text_key,
)
from padlm.evaluation.stats import bootstrap_ci
from padlm.judges.llm import LLMJudge
from padlm.records import read_jsonl


def judge_summary(llm: LLMJudge, summary: dict, out: Path, plan: EvalPlan) -> dict:
    """Add ``llm_win_rate`` (+ CI) to every single-preference row of ``summary``."""
    prompts = {i["id"]: i["prompt"] for i in load_benchmark(plan.benchmark, plan.limit)}
    return _judge_rows(llm, summary["rows"], _records(out, summary, prompts), prompts,
                       read_scores(out))


def judge_directory(llm: LLMJudge, out: Path, against: str = BASE,
                    labels: Sequence[str] | None = None, both_orders: bool = False) -> dict:
    """Judge a finished ``padlm eval`` directory: each row's responses (``labels`` only, when
    given) against the ``against`` row's on the same prompts; writes ``llm_judge.json``
    (against ``base``) or ``llm_judge_vs_<against>.json``, with ``_no_ties`` (a forced
    choice), ``_<N>_votes`` (sampled votes) and ``_logprobs`` before the suffix."""
    if not (out / SUMMARY).exists():
        raise PadlmError(f"{out / SUMMARY} does not exist: run `padlm eval` first")
    summary = json.loads((out / SUMMARY).read_text())
    known = {r["label"] for r in summary["rows"]}
    unknown = [label for label in (against, *(labels or ())) if label not in known]
    if unknown:
        raise PadlmError(f"{out} has no strategy labelled {', '.join(unknown)}; its labels: "
                         f"{', '.join(sorted(known))}")
    prompts = {i["id"]: i["prompt"] for i in load_benchmark(summary["benchmark"],
                                                            summary["limit"])}
    rows = [r for r in summary["rows"] if r["preference"] in PSOUPS
            and (labels is None or r["label"] in labels)]
    result = _judge_rows(llm, rows, _records(out, summary, prompts), prompts, read_scores(out),
                         against, both_orders)
    result["judge"] = {"url": llm.base_url, "model": llm.model, "against": against,
                       "orders": "both" if both_orders else "random", "ties": llm.ties,
                       "samples": llm.samples, "logprobs": llm.logprobs}
    name = ("llm_judge" + ("" if against == BASE else f"_vs_{against}")
            + ("" if llm.ties else "_no_ties")
            + (f"_{llm.samples}_votes" if llm.samples > 1 else "")
            + ("_logprobs" if llm.logprobs else "") + ".json")
    write_json_atomic(out / name, result)
    return result


def _records(out: Path, summary: dict, prompts: dict[str, str]) -> list[dict]:
    """The generations the summary measured, for its prompts."""
    return [r for r in measured_records(read_jsonl(out / GENERATIONS), summary)
            if r["id"] in prompts]


def same_side(first: float, second: float) -> bool:
    """Whether a pair's two orders favour the same response (or both tie): its position
    consistency, for single verdicts (0, 0.5, 1) and vote shares alike."""
    return (first > 0.5, first < 0.5) == (second > 0.5, second < 0.5)


def rule_agreement(verdicts: Sequence[float], rule_gaps: Sequence[float | None]
                   ) -> tuple[float | None, int]:
    """How often the LLM judge and the rule judge pick the same response, over the pairs
    where both pick one (``rule_gaps`` signed so > 0 means the method's response wins)."""
    decided = [(v > 0.5) == (g > 0) for v, g in zip(verdicts, rule_gaps, strict=True)
               if v != 0.5 and g is not None and g != 0]
    return (round(sum(decided) / len(decided), 4) if decided else None), len(decided)


def _judge_rows(llm: LLMJudge, rows: list[dict], records: list[dict],
                prompts: dict[str, str], scores: dict[str, dict], against: str = BASE,
                both_orders: bool = False) -> dict:
    cache = llm.load_cache()
    judged: dict[str, list[tuple[str, float, float | None, bool | None]]] = {}
    for row in rows:
        if row["label"] in (against, BASE) or "combination" in row:
            continue
        theirs = {r["id"]: r for r in records if r["label"] == against
                  and r["preference"] in ("", row["preference"])}
        mine = [r for r in records if r["preference"] == row["preference"]
                and r["label"] == row["label"] and r["id"] in theirs]
        if not mine:
            continue
        items = [(prompts[r["id"]], row["preference"], r["text"], theirs[r["id"]]["text"])
                 for r in mine]
        consistent: list[bool | None] = [None] * len(items)
        if both_orders:
            pairs = llm.compare_both_orders(items, cache)
            verdicts = [(first + second) / 2 for first, second in pairs]
            consistent = [same_side(first, second) for first, second in pairs]
            row["llm_position_consistency"] = round(sum(consistent) / len(pairs), 4)
        else:
            verdicts = llm.compare_many(items, cache)
        judge, sign = row["direction"]["judge"], row["direction"]["sign"]
        gaps = [_gap(scores, prompts[r["id"]], r, theirs[r["id"]], judge, sign) for r in mine]
        judged.setdefault(row["label"], []).extend(
            zip([r["id"] for r in mine], verdicts, gaps, consistent, strict=True))
        lo, hi = bootstrap_ci(verdicts)
        row["llm_win_rate"] = round(sum(verdicts) / len(verdicts), 4)
        row["llm_win_rate_ci"] = [round(lo, 4), round(hi, 4)]
        row["llm_judge"] = llm.model
        row["llm_against"] = against
        row["llm_rule_agreement"], row["llm_rule_agreement_pairs"] = rule_agreement(verdicts,
                                                                                    gaps)
    keys = ("label", "preference", "llm_against", "llm_win_rate", "llm_win_rate_ci",
            "llm_position_consistency", "llm_rule_agreement", "llm_rule_agreement_pairs")
    return {"rows": [{k: r[k] for k in keys if k in r} for r in rows
                     if r.get("llm_against") == against],
            "pooled": [pooled(label, against, pairs) for label, pairs in judged.items()]}


def pooled(label: str, against: str,
           pairs: Sequence[tuple[str, float, float | None, bool | None]]) -> dict:
    """One label's verdicts over all its preferences, ``(prompt id, verdict, rule gap,
    same verdict in both orders)`` per pair. The interval resamples prompts, not pairs: a
    prompt's pairs under different preferences share its responses' quirks, so treating them
    as independent would make the interval too narrow."""
    by_prompt: dict[str, list[float]] = {}
    for prompt_id, verdict, _, _ in pairs:
        by_prompt.setdefault(prompt_id, []).append(verdict)
    lo, hi = bootstrap_ci([sum(v) / len(v) for v in by_prompt.values()])
    agreement, decided = rule_agreement([p[1] for p in pairs], [p[2] for p in pairs])
    consistent = [p[3] for p in pairs if p[3] is not None]
    return {"label": label, "llm_against": against, "pairs": len(pairs),
            "prompts": len(by_prompt),
            "llm_win_rate": round(sum(p[1] for p in pairs) / len(pairs), 4),
            "llm_win_rate_ci": [round(lo, 4), round(hi, 4)],
            "llm_position_consistency": (round(sum(consistent) / len(consistent), 4)
                                         if consistent else None),
            "llm_rule_agreement": agreement, "llm_rule_agreement_pairs": decided}


def _gap(scores: dict[str, dict], prompt: str, mine: dict, theirs: dict, judge: str,
         sign: int) -> float | None:
    """The rule judge's signed difference, method minus other (None when unscored)."""
    a = scores.get(text_key(prompt, mine["text"]), {}).get(judge)
    b = scores.get(text_key(prompt, theirs["text"]), {}).get(judge)
    return None if a is None or b is None else sign * (a - b)
