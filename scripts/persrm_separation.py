"""Does greedy PAD separate the opposed P-Soups preferences further than prompting and
Linear Alignment, without more echo or repetition loops?

30 held-out prompts (Self-Instruct prompts in the validation split: never trained on; not
koala), the six P-Soups preferences, greedy decoding, the same settings for every strategy.
Simple measures, never used as training labels: word count (P2A shorter than P2B) and VADER
compound (P3A friendlier than P3B) from :mod:`padlm.judges.text`, mean syllables per word
(P1A simpler than P1B). Echo and loops are the library's guards (:mod:`padlm.judges.guards`:
6 consecutive words of the preference or of PAD's template; a word 4-gram occurring 3+
times); paraphrased echo, measured only here, = 3 of the preference's content words.
Generations are appended to a JSONL keyed by (strategy, weight, echo guard, preference,
prompt) so strategies can run at different times and the script resumes; the summary reads
only the chosen prompts' records. Each separation comes with its standard error over prompts
and the paired difference (and its standard error) to prompting and to Linear Alignment.

``--unseen`` adds the axes no PersRM is trained on (``sassy`` vs ``earnest``, ``sarcastic``
vs ``sincere``). No rule measures them, so their judge is learned: a Bradley-Terry head on
MiniLM embeddings (the per-dimension reward models' recipe) fitted on the teacher data's pairs
of that axis from the *training* split of prompts only (the evaluation prompts are validation
prompts, so the judge never saw them); its held-out pairwise accuracy is in the summary.

    .venv/bin/python scripts/persrm_separation.py --strategies prompt,linear-alignment
    .venv/bin/python scripts/persrm_separation.py --strategies pad --persrm DIR --weight 1.0
    .venv/bin/python scripts/persrm_separation.py --strategies pad,linear-alignment --echo-guard
    .venv/bin/python scripts/persrm_separation.py --unseen --strategies prompt,linear-alignment,pad

Another base model and a guide (each record carries its base model; one outputs file may hold
several, the summary reads only ``--model``'s):

    .venv/bin/python scripts/persrm_separation.py --model qwen2.5-coder-1.5b-instruct \
        --dtype bfloat16 --persrm qwen2.5-coder-0.5b-instruct --reference guide-unconditioned \
        --weight 1.0 --prompts 50 --outputs reports/guides/separation-outputs.jsonl \
        --out reports/guides/separation-qwen1.5b.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

import textstat
import torch

from padlm import GenerationConfig, Personalizer
from padlm.atomic import write_json_atomic
from padlm.core.models import DEFAULT_MODEL
from padlm.core.preferences import PSOUPS
from padlm.core.registry import strategy_class
from padlm.data.axes import AXES, HELD_OUT_AXES, HELD_OUT_DIMENSIONS, SIDES
from padlm.data.pools import default_pool_dir, held_out_self_instruct
from padlm.data.schema import load_rows
from padlm.evaluation.stats import standard_error
from padlm.judges.guards import echo, loops
from padlm.judges.text import vader_compound, word_count
from padlm.orchestration.rewards import train_rewards
from padlm.records import JsonlAppender, read_jsonl

PAIRS = (("P1A", "P1B"), ("P2A", "P2B"), ("P3A", "P3B"))
UNSEEN_PAIRS = tuple((AXES[name].a.id, AXES[name].b.id) for name in HELD_OUT_AXES)


def preference_text(pid: str) -> str:
    return PSOUPS[pid] if pid in PSOUPS else SIDES[pid].text


def held_out_prompts(count: int) -> list[dict]:
    chosen = held_out_self_instruct(default_pool_dir())
    return [{"id": p.id, "prompt": p.prompt} for p in chosen[:count]]


def syllables_per_word(text: str) -> float:
    """Mean syllables per word: how hard the words are, free of sentence length (measured
    only here; the harness's P1 judge is the Flesch-Kincaid grade)."""
    words = re.findall(r"[A-Za-z']+", text)
    return textstat.syllable_count(text) / len(words) if words else 0.0


def text_measure(measure):
    return lambda record: measure(record["text"])


# per pair, keyed by its A side: (summary key, name, measure of a record, sign)
MEASURES = {"P1A": ("P1", "syllables_per_word", text_measure(syllables_per_word), -1),
            "P2A": ("P2", "words", text_measure(word_count), -1),  # A should be LOWER
            "P3A": ("P3", "vader_compound", text_measure(vader_compound), +1)}


def add_unseen_judges(data: Path, records: list[dict], prompts: dict[str, str]) -> dict:
    """Fit each unseen axis's judge (see the module docstring), score every record of that
    axis into ``record["judge"]``, register its measure; returns the judges' accuracies."""
    rows, _ = load_rows(data)
    sides = [a for a, _ in UNSEEN_PAIRS]
    judges = train_rewards(rows, sides)
    scored = [r for r in records if r["preference"] in HELD_OUT_DIMENSIONS
              and r["prompt_id"] in prompts]
    if scored:
        scores = judges.scores([prompts[r["prompt_id"]] for r in scored],
                               [r["text"] for r in scored])
        for record, row in zip(scored, scores.tolist(), strict=True):
            record["judge"] = dict(zip(judges.dimensions, row, strict=True))
    for name in HELD_OUT_AXES:
        side = AXES[name].a.id
        MEASURES[side] = (name, f"judge_{side}", lambda record, side=side: record["judge"][side],
                          +1)
    return judges.metrics


FRAME = {"generate", "response", "that", "only", "could", "without", "being", "very", "like",
         "manner", "missing", "which", "with", "point", "easily"}


def paraphrased_echo(text: str, preference: str) -> bool:
    """A looser echo: 3 of the preference's content words (all, if it has fewer; compared by
    their first 6 letters, so "understood" meets "understand") in the output, e.g. "a PhD
    student studying this particular field"."""
    stems = {w[:6] for w in re.findall(r"[a-z]+", preference.lower())
             if len(w) >= 3 and w not in FRAME and w not in {"the", "and", "any", "for", "can"}}
    words = set(re.findall(r"[a-z]+", text.lower()))
    return sum(any(w.startswith(stem) for w in words) for stem in stems) >= min(3, len(stems))


def prompt_gaps(prefs: dict, a: str, b: str) -> dict[str, float]:
    """Per prompt: how far the A output sits from the B output, signed so > 0 is right."""
    _, _, measure, sign = MEASURES[a]
    return {i: sign * (measure(prefs[a][i]) - measure(prefs[b][i]))
            for i in sorted(set(prefs[a]) & set(prefs[b]))}


def comparison_runs(run: str) -> list[str]:
    """The runs a run is compared with prompt by prompt: prompting and Linear Alignment
    (alpha 1) with the same echo-guard setting."""
    guard = "+echo-guard" if run.endswith("+echo-guard") else ""
    return [r for r in ("prompt", f"linear-alignment[alpha=1.0]{guard}") if r != run]


def of_model(records: list[dict], model: str) -> list[dict]:
    """The records generated by base model ``model`` (records before the field existed were
    all generated by the default model)."""
    return [r for r in records if r.get("model", DEFAULT_MODEL) == model]


def summarize(records: list[dict], prompt_ids: set[str]) -> dict:
    """Per run that covers every chosen prompt: echo / loop counts and, per opposed pair,
    the mean gap with its standard error, and the paired difference to prompting and
    Linear Alignment (same prompts)."""
    by = {}
    for r in records:
        if r["prompt_id"] in prompt_ids:
            by.setdefault(r["run"], {}).setdefault(r["preference"], {})[r["prompt_id"]] = r
    summary = {}
    for run, prefs in by.items():
        entry = {}
        texts = [r for pid, p in prefs.items() if pid in PSOUPS for r in p.values()]
        if len(texts) < len(PSOUPS) * len(prompt_ids):  # run on fewer prompts: not comparable
            continue
        entry["outputs"] = len(texts)
        entry["echo"] = sum(echo(r["text"], PSOUPS[r["preference"]]) for r in texts)
        entry["paraphrased_echo"] = sum(paraphrased_echo(r["text"], PSOUPS[r["preference"]])
                                        for r in texts)
        entry["loops"] = sum(loops(r["text"]) for r in texts)
        entry["hit_token_limit"] = sum(r["finish_reason"] == "length" for r in texts)
        entry["mean_words"] = round(statistics.mean(word_count(r["text"]) for r in texts), 1)
        for a, b in (*PAIRS, *UNSEEN_PAIRS):
            if a not in MEASURES or any(len(prefs.get(s, ())) < len(prompt_ids)
                                        for s in (a, b)):
                continue
            key, name, measure, _ = MEASURES[a]
            gaps = prompt_gaps(prefs, a, b)
            pair = {"measure": name,
                    f"mean_{a}": round(statistics.mean(measure(prefs[a][i]) for i in gaps), 3),
                    f"mean_{b}": round(statistics.mean(measure(prefs[b][i]) for i in gaps), 3),
                    "separation": round(statistics.mean(gaps.values()), 4),
                    "separation_se": round(standard_error(list(gaps.values())), 4),
                    "right_direction": sum(g > 0 for g in gaps.values()),
                    "prompts": len(gaps)}
            for other in comparison_runs(run):
                theirs = by.get(other, {})
                if any(len(theirs.get(s, ())) < len(prompt_ids) for s in (a, b)):
                    continue
                their_gaps = prompt_gaps(theirs, a, b)
                diffs = [gaps[i] - their_gaps[i] for i in gaps if i in their_gaps]
                pair[f"minus {other}"] = {"mean": round(statistics.mean(diffs), 4),
                                          "se": round(standard_error(diffs), 4),
                                          "prompts": len(diffs)}
            entry[key] = pair
        summary[run] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="prompt,linear-alignment,pad")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the base model")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--persrm", default="default")
    parser.add_argument("--reference", default=None, help="PAD's reward reference")
    parser.add_argument("--guide-alignment", default="auto",
                        help="how a separate guide reads the base's tokens (ids, text, "
                             "first-token)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per forward (default: all prompts of a preference)")
    parser.add_argument("--weight", type=float, default=None)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3)
    parser.add_argument("--echo-guard", action="store_true",
                        help="pad / linear-alignment: no bonus for the preference's words")
    parser.add_argument("--outputs", type=Path,
                        default=Path("reports/persrm_separation_outputs.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("reports/persrm_separation.json"))
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--unseen", action="store_true",
                        help="also the held-out axes, scored by a judge fitted on --data")
    parser.add_argument("--data", type=Path, default=Path("data/teacher_pairs.jsonl"),
                        help="preference JSONL the unseen axes' judges are fitted on")
    args = parser.parse_args()
    torch.set_num_threads(2)
    records = of_model(read_jsonl(args.outputs), args.model)
    done = {(r["run"], r["preference"], r["prompt_id"]) for r in records}
    prompts = held_out_prompts(args.prompts)
    unseen = [side for pair in UNSEEN_PAIRS for side in pair] if args.unseen else []
    preferences = [*PSOUPS, *unseen]
    if not args.summarize_only:
        engine = Personalizer(args.model, persrm=args.persrm, dtype=args.dtype,
                              reference=args.reference, guide_alignment=args.guide_alignment)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size,
                                  weight=args.weight)
        with JsonlAppender(args.outputs) as appender:
            for strategy in args.strategies.split(","):
                weight = (args.weight if args.weight is not None
                          else engine.persrm.config.recommended_weight)
                # keyed by the head's fingerprint: a retrained PersRM never reuses old outputs
                run = strategy if strategy != "pad" else (
                    f"pad[{Path(engine.persrm_name).name}@{engine.persrm.fingerprint()},"
                    f"w={weight}]")
                if strategy == "linear-alignment":
                    run = f"linear-alignment[alpha={args.weight or 1.0}]"
                guard = args.echo_guard and strategy_class(strategy).spec.echo_guard
                if guard:
                    run += "+echo-guard"
                for pid in preferences:
                    todo = [p for p in prompts if (run, pid, p["id"]) not in done]
                    if not todo:
                        continue
                    began = time.perf_counter()
                    outs = engine.generate([p["prompt"] for p in todo], preference_text(pid),
                                           strategy,
                                           replace(config, echo_guard=guard),
                                           batch_size=args.batch_size or len(todo))
                    print(f"{run} {pid}: {len(todo)} in {time.perf_counter() - began:.0f} s",
                          flush=True)
                    for p, g in zip(todo, outs, strict=True):
                        record = {"run": run, "model": args.model, "strategy": strategy,
                                  "preference": pid,
                                  "prompt_id": p["id"], "text": g.text,
                                  "finish_reason": g.finish_reason, "tokens": g.new_tokens}
                        appender.write(record)
                        records.append(record)
    summary = {"model": args.model, "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens,
               "decoding": f"greedy, no_repeat_ngram_size={args.no_repeat_ngram_size}"}
    if args.unseen:
        summary["unseen_judges"] = add_unseen_judges(
            args.data, records, {p["id"]: p["prompt"] for p in prompts})
    summary["runs"] = summarize(records, {p["id"] for p in prompts})
    write_json_atomic(args.out, summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
