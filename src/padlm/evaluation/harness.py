"""``padlm eval``: generate with every strategy, score with the offline judges, summarise.

Three stages, each restartable:

1. **Generate** into ``generations.jsonl``, append-only, one flushed line per response, keyed
   by (prompt id, preference, strategy, params, decoding settings). A rerun skips every key
   already there, so an interrupted run continues where it stopped. ``base`` ignores the
   preference, so it is generated once per prompt and reused for every preference.
2. **Score** every distinct (prompt, response) with the judges; scores are cached in
   ``scores.jsonl`` the same way (perplexity under the base model is the slow one).
3. **Summarise** into ``summary.json`` + ``report.md`` + PNG plots (``padlm.evaluation.report``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from padlm.atomic import write_json_atomic
from padlm.core.config import MIX_MODES, GenerationConfig
from padlm.core.preferences import PRESETS, PSOUPS, looks_like_ids, parse_preference, preference_ids
from padlm.core.registry import strategy_class, strategy_names
from padlm.errors import PadlmError
from padlm.evaluation.report import write_report
from padlm.evaluation.stats import (
    bootstrap_ci,
    outcomes,
    paired_differences,
    standard_error,
)
from padlm.judges import JUDGES, get_judge, primary_direction
from padlm.judges import guards as _guards
from padlm.records import JsonlAppender, load_prompts, read_jsonl

log = logging.getLogger(__name__)

GENERATIONS = "generations.jsonl"
SCORES = "scores.jsonl"
SUMMARY = "summary.json"
BASE = "base"  # the reference every win rate is measured against, generated once per prompt
SWEPT = "pad"  # the method under evaluation: --weights adds weights beside the recommended one
# Settings added after runs were first saved: left out of the key while at their default, so
# those runs keep their keys (and are reused).
LATER_SETTINGS = {"echo_guard": False, "mix": None}
CELL_MIX = ":"  # --strategies mix:pcm = strategy mix with mixing weights pcm
SCORE_JUDGES = ("expertise", "dale_chall", "informativeness", "content_words", "friendliness",
                "relevance", "harmlessness")


# ---------------------------------------------------------------- what to run


@dataclass(frozen=True)
class Dimension:
    """One directional question asked of a preference's outputs: did ``judge`` move ``sign``?"""

    label: str  # "P1A", or "friendliness:+" for a free-text preference
    judge: str
    sign: int


@dataclass(frozen=True)
class Job:
    """One (preference, strategy, params) cell: every prompt is generated with it."""

    preference: str  # the spec as the user wrote it ("" for base: it ignores preferences)
    strategy: str
    params: tuple[tuple[str, float | int | str], ...] = ()

    @property
    def params_dict(self) -> dict:
        return dict(self.params)

    @property
    def label(self) -> str:
        """The strategy, plus its weight when the job sets one (the sweep's cells differ only
        in it) or its mixing weights (``mix:pcm``); a sampled strategy's ``n`` is one value for
        the whole run, so it is left out."""
        params = self.params_dict
        if "mix" in params:
            return f"{self.strategy}{CELL_MIX}{params['mix']}"
        weight = params.get("weight")
        return self.strategy if weight is None else f"{self.strategy}@weight={weight:g}"


@dataclass
class EvalPlan:
    benchmark: str
    preferences: list[str]
    strategies: list[str]
    weights: list[float] = field(default_factory=list)  # PAD weight sweep
    limit: int | None = None
    config: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 8
    n: int = 4  # best-of-n samples
    directions: list[tuple[str, int]] = field(default_factory=list)  # for free-text prefs
    bootstrap_seed: int = 0


def load_benchmark(name: str, limit: int | None = None) -> list[dict[str, str]]:
    """``psoups`` (the 50 Koala prompts the PAD and P-Soups papers use) or a prompts file."""
    if name == "psoups":
        path = Path(str(resources.files("padlm") / "assets" / "benchmarks" /
                        "koala_eval_50.json"))
    else:
        path = Path(name)
        if not path.is_file():
            raise PadlmError(f"unknown benchmark {name!r}: give 'psoups' or a prompts file")
    items = load_prompts(path)
    ids = [i["id"] for i in items]
    if len(set(ids)) != len(ids):
        raise PadlmError(f"benchmark {name}: prompt ids are not unique")
    if limit is not None:
        if limit < 1:
            raise PadlmError("--limit must be >= 1")
        items = items[:limit]
    return items


def dimensions(spec: str, directions: Sequence[tuple[str, int]]) -> list[Dimension]:
    """The directional judges of one preference: preset ids map to their primary judge;
    free text needs ``--judge NAME:+`` directions."""
    ids = preference_ids(spec)
    if ids is not None:
        return [Dimension(i, *primary_direction(i)) for i in ids]
    if looks_like_ids(spec):
        parse_preference(spec)  # raises the unknown-id error
    if not directions:
        raise PadlmError(f"free-text preference {spec!r} needs at least one --judge "
                         "NAME:+ or NAME:- saying which way it should move")
    return [Dimension(f"{j}:{'+' if s > 0 else '-'}", j, s) for j, s in directions]


def parse_cell(entry: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``pad`` -> (pad, ()); ``mix:pcm`` -> (mix, (("mix", "pcm"),)): an expert strategy with
    its mixing weights (pcm | uniform | logit), checked here, before any model loads."""
    strategy, _, mix = entry.partition(CELL_MIX)
    known = strategy_names()
    if strategy not in known:
        raise PadlmError(f"unknown strategy {strategy}; choose from {', '.join(known)}")
    if not mix:
        return strategy, ()
    if mix not in MIX_MODES or not strategy_class(strategy).spec.uses_experts:
        raise PadlmError(f"{entry}: a cell's mixing weights go with an expert strategy "
                         f"({', '.join(strategy_names(uses_experts=True))}) and are one of "
                         f"{', '.join(MIX_MODES)}")
    return strategy, (("mix", mix),)


def jobs(plan: EvalPlan, recommended_weight: float) -> list[Job]:
    """Every cell to generate. The swept strategy (PAD) runs at the PersRM's recommended weight
    and at each sweep weight (deduplicated); sequence-level strategies (best-of-n) draw
    ``plan.n`` samples; ``base`` runs once with no preference; ``mix:pcm`` is a cell of
    strategy ``mix`` with mixing weights ``pcm``."""
    cells = [parse_cell(entry) for entry in plan.strategies]
    # Strategy-major, the sweep and the sampled strategies (the costly ones) last: a run
    # stopped early still has complete cells for every preference of the cheap strategies.
    out, sweep, sampled = [Job("", BASE)], [], []
    sweep_weights = sorted({*map(float, plan.weights)} - {float(recommended_weight)})
    for strategy, params in cells:
        if strategy == BASE:
            continue
        sequence_level = strategy_class(strategy).spec.level == "sequence"
        for preference in plan.preferences:
            if strategy == SWEPT:
                out.append(Job(preference, SWEPT, (("weight", float(recommended_weight)),)))
                sweep.extend(Job(preference, SWEPT, (("weight", w),)) for w in sweep_weights)
            elif sequence_level:
                sampled.append(Job(preference, strategy, (("n", plan.n),)))
            else:
                out.append(Job(preference, strategy, params))
    return out + sweep + sampled


# ---------------------------------------------------------------- append-only JSONL


def config_key(config: GenerationConfig, engine=None) -> dict:
    """What changes an output besides the job: decoding settings (weight is per job, in
    params) and, given the engine, the model, dtype and placement."""
    data = asdict(replace(config, weight=None))
    data["stop"] = list(data["stop"])
    for name, default in LATER_SETTINGS.items():
        if data.get(name, default) == default:
            data.pop(name, None)
    if engine is not None:
        data.update(model=engine.lm.name, placement=engine.placement,
                    dtype=engine.lm.dtype_name)
    return data


@dataclass(frozen=True)
class CellKeys:
    """What a stored response's key holds besides its prompt and job: the decoding settings
    and the fingerprints of the models a strategy reads. A fingerprint counts only for the
    strategies that use that model: a newly trained PersRM regenerates the PersRM cells and
    reuses every other one, new experts or PCM the expert cells."""

    config: dict
    persrm: str
    experts: str | None = None  # None: no cell of this run uses the experts
    scorer: str | None = None  # the sequence scorer's; None: no cell of this run uses it

    @classmethod
    def of(cls, engine, plan: EvalPlan, decoder=None) -> CellKeys:
        """``decoder``: another engine that generates (vLLM); its cells get keys of their
        own, so they never stand in for the HF engine's (their sampling differs)."""
        specs = [strategy_class(parse_cell(e)[0]).spec for e in plan.strategies]
        config = config_key(plan.config, engine)
        if decoder is not None:
            config["engine"] = decoder.engine_name
        persrm = plan_persrm(engine, plan)
        from padlm.orchestration.experts import engine_experts

        return cls(config, persrm.fingerprint() if persrm else "none",
                   engine_experts(engine).fingerprint() if any(s.uses_experts for s in specs)
                   else None,
                   engine.scorer.fingerprint() if any(s.uses_scorer for s in specs) else None)

    def key(self, prompt_id: str, job: Job) -> str:
        spec = strategy_class(job.strategy).spec
        # the reward model's fingerprint: the PersRM's, or for args and best-of-n their
        # scorer's (the PersRM's own when it scores them, so cells made before the scorer was
        # a choice keep their keys under --scorer persrm, and only there)
        reward = self.persrm if spec.uses_persrm else self.scorer if spec.uses_scorer \
            else None
        fields = [prompt_id, job.preference, job.strategy, job.params_dict, self.config,
                  reward]
        if spec.uses_experts:  # appended: keys of the other strategies stay as they were
            fields.append(self.experts)
        return json.dumps(fields, sort_keys=True)


def measured_records(records: Iterable[dict], summary: dict) -> list[dict]:
    """The stored responses ``summary`` measured. A directory keeps every response it ever
    generated, an earlier PersRM's or experts' too (under other keys), so the decoding
    settings alone would mix runs: the fingerprints in each key decide (summaries older than
    the ``experts`` field are not checked for it)."""
    rewards = (None, summary["persrm"]["fingerprint"],
               (summary.get("scorer") or {}).get("fingerprint"))

    def measured(record: dict) -> bool:
        fields = json.loads(record["key"])
        experts_match = ("experts" not in summary or len(fields) < 7
                         or fields[6] == summary["experts"])
        return fields[4] == summary["generation"] and fields[5] in rewards and experts_match

    return [r for r in records if measured(r)]


# ---------------------------------------------------------------- stage 1: generate


def generate(engine, plan: EvalPlan, out: Path, progress: bool = True,
             stop_after: int | None = None, decoder=None) -> list[dict]:
    """Generate every missing (prompt, job) into ``out/generations.jsonl``; return all records.

    ``stop_after`` stops after that many new responses (tests use it to simulate a crash).
    ``decoder`` generates instead of ``engine`` (``--engine vllm``); ``engine`` still scores.
    """
    items = load_benchmark(plan.benchmark, plan.limit)
    for spec in plan.preferences:
        dimensions(spec, plan.directions)  # validate before spending CPU
    if any(strategy_class(job.strategy).spec.uses_scorer for job in jobs(plan, 1.0)):
        for spec in plan.preferences:  # e.g. the dimension rewards refuse free text
            engine.scorer.check(engine.request("?", spec))
    todo = jobs(plan, recommended_weight(engine, plan))
    path = out / GENERATIONS
    keys = CellKeys.of(engine, plan, decoder)
    decoder = decoder or engine
    done = {r["key"] for r in read_jsonl(path)}
    pending = [(job, [i for i in items if keys.key(i["id"], job) not in done])
               for job in todo]
    total = sum(len(missing) for _, missing in pending)
    log.info("%d responses to generate (%d already in %s)", total,
             len(todo) * len(items) - total, path)
    appender, produced = JsonlAppender(path), 0
    bar = tqdm(total=total, desc="generate", unit="resp", disable=not progress)
    try:
        for job, missing in pending:
            guarded = plan.config.echo_guard and strategy_class(job.strategy).spec.echo_guard
            config = replace(plan.config, weight=job.params_dict.get("weight"),
                             echo_guard=guarded, mix=job.params_dict.get("mix"))
            # a sampled job decodes n rows per prompt: keep its chunks as large in rows
            step = max(1, plan.batch_size // plan.n) if "n" in job.params_dict \
                else plan.batch_size
            for start in range(0, len(missing), step):
                chunk = missing[start:start + step]
                bar.set_postfix_str(f"{job.label} {job.preference or '-'}", refresh=False)
                results = decoder.generate([i["prompt"] for i in chunk],
                                           job.preference or None, job.strategy, config,
                                           batch_size=len(chunk), n=plan.n)
                for item, result in zip(chunk, results, strict=True):
                    appender.write({
                        "key": keys.key(item["id"], job), "id": item["id"],
                        "preference": job.preference, "strategy": job.strategy,
                        "params": job.params_dict, "label": job.label, "text": result.text,
                        "new_tokens": result.new_tokens, "finish_reason": result.finish_reason,
                        "seconds": round(result.seconds, 4), "config": keys.config,
                    })
                    produced += 1
                bar.update(len(chunk))
                if stop_after is not None and produced >= stop_after:
                    return read_jsonl(path)
    finally:
        bar.close()
        appender.close()
    return read_jsonl(path)


# ---------------------------------------------------------------- stage 2: score


def text_key(prompt: str, text: str) -> str:
    return hashlib.sha256(json.dumps([prompt, text]).encode()).hexdigest()[:24]


def read_scores(out: Path) -> dict[str, dict]:
    """Every response's judge scores cached in ``out/scores.jsonl``, by :func:`text_key`."""
    return {r["key"]: r["scores"] for r in read_jsonl(out / SCORES)}


def score(engine, records: Sequence[dict], prompts: dict[str, str], out: Path,
          batch_size: int = 16, progress: bool = True) -> dict[str, dict]:
    """Judge every distinct (prompt, response); cached in ``out/scores.jsonl``."""
    path = out / SCORES
    cache = read_scores(out)
    todo: dict[str, tuple[str, str]] = {}
    for record in records:
        prompt = prompts[record["id"]]
        key = text_key(prompt, record["text"])
        if key not in cache:
            todo[key] = (prompt, record["text"])
    appender = JsonlAppender(path)
    keys = list(todo)
    try:
        for start in tqdm(range(0, len(keys), batch_size), desc="score", unit="batch",
                          disable=not progress or not keys):
            chunk = keys[start:start + batch_size]
            ps = [todo[k][0] for k in chunk]
            rs = [todo[k][1] for k in chunk]
            columns = {name: JUDGES[name].score(ps, rs) for name in SCORE_JUDGES}
            columns["perplexity"] = _guards.perplexity(engine.lm, ps, rs, batch_size=8)
            for n in (2, 3, 4):
                columns[f"rep{n}"] = [_guards.rep_n(r, n) for r in rs]
            for i, key in enumerate(chunk):
                scores = {name: _round(values[i]) for name, values in columns.items()}
                appender.write({"key": key, "scores": scores})
                cache[key] = scores
    finally:
        appender.close()
    return cache


def _round(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


# ---------------------------------------------------------------- stage 3: summarise


def summarize(engine, plan: EvalPlan, records: Sequence[dict], scores: dict[str, dict],
              command: str | None = None) -> dict:
    """Per strategy x preference x dimension: judge means, directional win rate vs base with a
    95% bootstrap interval, guards and speed. Pure given its inputs (tests rely on that)."""
    items = load_benchmark(plan.benchmark, plan.limit)
    prompts = {i["id"]: i["prompt"] for i in items}
    order = [i["id"] for i in items]
    keys = CellKeys.of(engine, plan)
    by_key = {r["key"]: r for r in records}
    base_job = Job("", BASE)
    recommended = float(recommended_weight(engine, plan))
    rows: list[dict] = []
    incomplete: list[dict] = []
    combined: dict[str, dict[tuple[str, str], np.ndarray]] = {}  # label -> cell -> outcomes
    singles: dict[str, dict[tuple[str, str], np.ndarray]] = {}  # the six P-Soups sides

    def cell(job: Job) -> list[dict] | None:
        found = [by_key.get(keys.key(pid, job)) for pid in order]
        return None if any(r is None for r in found) else found

    base = cell(base_job)
    if base is None:
        raise PadlmError("base generations are incomplete; rerun `padlm eval` to finish them")
    for spec in plan.preferences:
        dims = dimensions(spec, plan.directions)
        preference_text = parse_preference(spec).text
        for job in jobs(plan, recommended):
            if job.preference not in ("", spec):
                continue
            found = base if job.strategy == BASE else cell(job)
            if found is None:
                log.warning("skipping %s %s: generations incomplete", job.label, spec)
                incomplete.append({"label": job.label, "preference": spec})
                continue
            s = [scores[text_key(prompts[r["id"]], r["text"])] for r in found]
            b = [scores[text_key(prompts[r["id"]], r["text"])] for r in base]
            texts = [r["text"] for r in found]
            seconds = sum(r["seconds"] for r in found)
            tokens = sum(r["new_tokens"] for r in found)
            common = {
                "strategy": job.strategy, "label": job.label, "params": job.params_dict,
                "headline": job.strategy != SWEPT or job.params_dict["weight"] == recommended,
                "n": len(found),
                "judges": {name: _mean(x[name] for x in s) for name in SCORE_JUDGES},
                "relevance": _mean(x["relevance"] for x in s),
                "harmlessness": _mean(x["harmlessness"] for x in s),
                "rep2": _mean(x["rep2"] for x in s), "rep3": _mean(x["rep3"] for x in s),
                "rep4": _mean(x["rep4"] for x in s),
                "distinct2": round(_guards.distinct_n(texts, 2), 4),
                "perplexity_median": _median(x["perplexity"] for x in s),
                "echo_rate": _mean(float(_guards.echo(t, preference_text)) for t in texts),
                "length_stop_rate": _mean(float(r["finish_reason"] == "length")
                                          for r in found),
                "mean_new_tokens": round(tokens / len(found), 2),
                "seconds_per_response": round(seconds / len(found), 4),
                "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
            }
            for dim in dims:
                result = outcomes([x[dim.judge] for x in s], [x[dim.judge] for x in b],
                                  dim.sign)
                lo, hi = bootstrap_ci(result, seed=plan.bootstrap_seed)
                row = {"preference": dim.label, **common,
                       "direction": {"judge": dim.judge, "sign": dim.sign},
                       "win_rate": round(float(result.mean()), 4),
                       "win_rate_ci": [round(lo, 4), round(hi, 4)],
                       "base_judge_mean": _mean(x[dim.judge] for x in b)}
                if len(dims) > 1 or preference_ids(spec) is None:
                    row["combination"] = spec
                    if job.strategy != BASE:
                        combined.setdefault(job.label, {})[spec, dim.label] = result
                elif spec in PSOUPS and job.strategy != BASE:
                    singles.setdefault(job.label, {})[spec, dim.label] = result
                rows.append(row)
    summary = {
        "benchmark": plan.benchmark, "model": engine.lm.name,
        "persrm": persrm_info(engine, plan_persrm(engine, plan)),
        "experts": keys.experts,
        "scorer": ({"name": engine.scorer.name, "fingerprint": keys.scorer}
                   if keys.scorer else None),
        "prompts": len(order), "limit": plan.limit, "generation": keys.config,
        "dtype": engine.lm.dtype_name,
        "weights": sorted({recommended, *map(float, plan.weights)}),
        "bootstrap": {"samples": 2000, "confidence": 0.95, "seed": plan.bootstrap_seed,
                      "unit": "prompt"},
        "judges": {name: JUDGES[name].measures for name in SCORE_JUDGES},
        "rows": rows,
        "incomplete": incomplete,
    }
    if command:
        summary["command"] = command
    summary["aggregate"] = aggregate(rows)
    if combined:
        summary["combinations"] = combination_summary(combined)
    if singles:  # the headline's mean win rate with standard errors and paired differences
        summary["singles"] = combination_summary(singles)
    return summary


def combination_summary(combined: dict[str, dict[tuple[str, str], np.ndarray]]) -> dict:
    """Per strategy label, the mean directional win rate over every (combination, dimension)
    cell, with its standard error over prompts, and the paired difference of every two
    labels. Only labels with every cell complete take part (they share the prompts)."""
    cells = set().union(*(set(by_cell) for by_cell in combined.values()))
    complete = {label: by_cell for label, by_cell in combined.items() if set(by_cell) == cells}
    per_prompt = {label: np.mean([by_cell[c] for c in sorted(cells)], axis=0)
                  for label, by_cell in complete.items()}
    return {
        "cells": len(cells),
        "combinations": sorted({spec for spec, _ in cells}),
        "labels": {label: {"mean_win_rate": round(float(values.mean()), 4),
                           "se": round(standard_error(values), 4), "prompts": values.size}
                   for label, values in per_prompt.items()},
        "paired": paired_differences(per_prompt),
    }


def plan_persrm(engine, plan: EvalPlan):
    """The engine's PersRM, or None where it cannot steer this model and no strategy of the
    plan reads it (a plan with ``pad`` gets the refusal)."""
    if any(strategy_class(parse_cell(e)[0]).spec.uses_persrm for e in plan.strategies):
        return engine.persrm
    return None if engine.persrm_refusal() else engine.persrm


def recommended_weight(engine, plan: EvalPlan) -> float:
    persrm = plan_persrm(engine, plan)
    return persrm.config.recommended_weight if persrm else 1.0


def persrm_info(engine, persrm) -> dict:
    if persrm is None:
        return {"name": "none", "fingerprint": "none", "identity_head": True, "lora": False,
                "recommended_weight": 1.0, "top_k": None, "placement": engine.placement,
                "training": {}}
    return {"name": persrm.name, "fingerprint": persrm.fingerprint(),
            "identity_head": bool(persrm.head.is_identity()),
            "lora": bool(persrm.config.lora),
            "recommended_weight": persrm.config.recommended_weight,
            "top_k": persrm.config.top_k, "placement": engine.placement,
            "training": persrm.config.training, "reference": persrm.reference,
            "guide": persrm.guide.name if persrm.separate else None}


def aggregate(rows: Sequence[dict]) -> dict[str, dict]:
    """Per strategy label, means over the six single P-Soups preferences (the headline)."""
    out: dict[str, dict] = {}
    single = [r for r in rows if r["preference"] in PSOUPS and "combination" not in r]
    for label in dict.fromkeys(r["label"] for r in single):
        mine = [r for r in single if r["label"] == label]
        out[label] = {
            "strategy": mine[0]["strategy"], "params": mine[0]["params"],
            "headline": mine[0]["headline"], "preferences": len(mine),
            "mean_win_rate": _mean(r["win_rate"] for r in mine),
            "relevance": _mean(r["relevance"] for r in mine),
            "harmlessness": _mean(r["harmlessness"] for r in mine),
            "rep4": _mean(r["rep4"] for r in mine),
            "echo_rate": _mean(r["echo_rate"] for r in mine),
            "length_stop_rate": _mean(r["length_stop_rate"] for r in mine),
            "seconds_per_response": _mean(r["seconds_per_response"] for r in mine),
            "tokens_per_second": _mean(r["tokens_per_second"] for r in mine
                                       if r["tokens_per_second"] is not None),
        }
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return round(statistics.fmean(data), 4) if data else None


def _median(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return round(statistics.median(data), 3) if data else None


# ---------------------------------------------------------------- all stages


def run(engine, plan: EvalPlan, out: Path, progress: bool = True, command: str | None = None,
        on_summary: Callable[[dict], None] | None = None,
        generate_missing: bool = True, decoder=None) -> dict:
    """Generate what is missing, score, write summary.json, report.md and the plots.
    ``generate_missing=False`` summarises only the cells already complete; ``decoder``
    generates instead of ``engine`` (see :func:`generate`)."""
    for spec in plan.preferences:
        if spec not in PRESETS and preference_ids(spec) is None:
            dimensions(spec, plan.directions)
    for name, _ in plan.directions:
        get_judge(name)
    out.mkdir(parents=True, exist_ok=True)
    records = generate(engine, plan, out, progress, decoder=decoder) if generate_missing \
        else read_jsonl(out / GENERATIONS)
    items = load_benchmark(plan.benchmark, plan.limit)
    prompts = {i["id"]: i["prompt"] for i in items}
    keys = CellKeys.of(engine, plan, decoder)
    wanted = {keys.key(i["id"], job)
              for job in jobs(plan, recommended_weight(engine, plan)) for i in items}
    records = [r for r in records if r["key"] in wanted]
    scores = score(engine, records, prompts, out, progress=progress)
    summary = summarize(engine, plan, records, scores, command)
    if on_summary is not None:
        on_summary(summary)
    write_json_atomic(out / SUMMARY, summary)
    write_report(summary, out)
    return summary
