"""How often a profile feature points the same way as the judge a simulated user chooses by.

Reads the explore pairs a ``padlm eval feedback`` run decoded on the training pool
(``rounds.jsonl``: two answers per user and round) and, per P-Soups axis, counts the pairs in
which the feature difference and the judge difference (in side A's direction) have the same
sign. A learner can only recover a user's taste as fast as its features agree with it, so
this is the ceiling on the curve that ``padlm eval feedback`` draws. Feature sources:

- ``rewards``: the per-dimension reward models (what profiles learn on);
- ``design``: the sides the explore pair was decoded for (+1 side A, -1 side B), i.e. how
  often decoding for a side moves the judge that way at all;
- ``persrm``: the shipped PersRM's summed implicit reward under side A's text minus side B's
  (the reference cancels), an alternative the issue names; it costs six PersRM scorings of
  each answer, so ``--persrm-pairs`` caps how many pairs it reads.

    python scripts/profile_feature_agreement.py reports/profiles/feedback-smollm2 \\
        --persrm-pairs 64 --out reports/profiles/feature-agreement.json

``ideal`` is a reference ceiling no learner of these choices can beat on average: a
Bayes-optimal learner that knows each pair's design and the ``design`` agreement rates, with
the simulated user's votes independent per axis at those rates, picking the most likely of
the eight targets after ``n`` all-axis contrasts (Monte Carlo). Uses the training pool's
prompts only (never ``koala_eval_50``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from itertools import product
from pathlib import Path

import numpy as np

from padlm.atomic import write_json_atomic
from padlm.data.axes import Axis
from padlm.data.pools import default_pool_dir, self_instruct_prompts
from padlm.evaluation.feedback import ROUNDS_FILE, judge_scores
from padlm.judges import primary_direction
from padlm.profiles.features import AXES, AxisFeatures, parse_axes
from padlm.records import read_jsonl


def agreement(features: list[list[float]], judges: list[dict[str, float]],
              axes: Sequence[Axis] = AXES) -> dict:
    """Per axis: pairs (answers 2i, 2i+1) where both differences are non-zero, the share of
    them whose signs agree, and how many pairs the judge scored alike (a simulated user's
    abstention) although the feature differed."""
    out = {}
    for index, axis in enumerate(axes):
        judge, sign = primary_direction(axis.a.id)
        agree = counted = ties = 0
        for i in range(0, len(features), 2):
            feature = features[i][index] - features[i + 1][index]
            judged = sign * (judges[i][judge] - judges[i + 1][judge])
            ties += bool(feature) and not judged
            if feature and judged:
                counted += 1
                agree += (feature > 0) == (judged > 0)
        out[axis.name] = {"pairs": counted, "agree": round(agree / counted, 3)
                          if counted else None, "judge_ties": ties}
    return out


def design_features(rounds: list[dict], axes: Sequence[Axis] = AXES) -> list[list[float]]:
    """Per answer and axis: +1 when it was decoded for side A, -1 for side B, 0 for neither
    (its preference text names each side's preset text)."""
    return [[1.0 if axis.a.text in preference else -1.0 if axis.b.text in preference else 0.0
             for axis in axes] for r in rounds for preference in r["preferences"]]


def ideal_sides_right(agree: list[float], choices: int, trials: int = 4000,
                      seed: int = 0) -> dict:
    """The Bayes-optimal learner's share of target sides right, and of targets wholly right,
    after ``choices`` all-axis contrasts (cycled), each axis's vote agreeing with the design
    with probability ``agree[a]`` and the majority deciding (a tie is a coin flip)."""
    rng = np.random.default_rng(seed)
    targets = np.array(list(product((1, -1), repeat=len(agree))))
    contrasts = targets[targets[:, 0] == 1]
    votes = np.array(list(product((1, -1), repeat=len(agree))))  # right (+1) or wrong
    weight = np.prod(np.where(votes == 1, agree, 1 - np.array(agree)), axis=1)

    def first_wins(target, contrast) -> float:
        margin = (votes * target * contrast).sum(axis=1)
        return float((weight * ((margin > 0) + 0.5 * (margin == 0))).sum())

    table = np.array([[first_wins(t, c) for c in contrasts] for t in targets])
    sides = whole = 0.0
    for _ in range(trials):
        truth = rng.integers(len(targets))
        log_likelihood = np.zeros(len(targets))
        for n in range(choices):
            c = n % len(contrasts)
            first = rng.random() < table[truth, c]
            log_likelihood += np.log(table[:, c] if first else 1 - table[:, c])
        guess = np.argmax(log_likelihood + rng.random(len(targets)) * 1e-9)
        sides += float(np.mean(targets[guess] == targets[truth]))
        whole += float(guess == truth)
    return {"choices": choices, "sides_right": round(sides / trials, 3),
            "targets_right": round(whole / trials, 3)}


def persrm_features(prompts: list[str], texts: list[str], axes: Sequence[Axis] = AXES
                    ) -> list[list[float]]:
    """``(R(y | A) - R(y | B)) / 2`` per axis with the shipped PersRM (its implicit reward)."""
    from padlm.core.engine import Personalizer
    from padlm.core.prompting import render
    from padlm.core.strategies import ImplicitRewardScorer

    engine = Personalizer("default", persrm="default")
    scorer = ImplicitRewardScorer(engine.lm, engine.persrm)
    tokenizer = engine.lm.tokenizer
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"]
                 or [tokenizer.eos_token_id] for t in texts]
    neutral = [render(tokenizer, p, "", engine.placement) for p in prompts]
    columns = []
    for axis in axes:
        sides = [scorer.score_ids([render(tokenizer, p, side.text, engine.placement)
                                   for p in prompts], responses, neutral)
                 for side in (axis.a, axis.b)]
        columns.append(((sides[0] - sides[1]) / 2).tolist())
    return [list(row) for row in zip(*columns, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a padlm eval feedback output directory")
    parser.add_argument("--persrm-pairs", type=int, default=0,
                        help="also score the first N pairs with the PersRM (0: not)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile-axes", default="P1,P2,P3",
                        help="the axes the run's profiles learned (its --profile-axes)")
    args = parser.parse_args()
    axes = parse_axes(args.profile_axes)
    pool = {p.id: p.prompt for p in self_instruct_prompts(default_pool_dir())}
    rounds = read_jsonl(args.run / ROUNDS_FILE)
    prompts = [pool[r["prompt"]] for r in rounds for _ in r["texts"]]
    texts = [t for r in rounds for t in r["texts"]]
    judges = judge_scores(prompts, texts, axes)
    record = {"run": str(args.run), "pairs": len(rounds),
              "rewards": agreement(AxisFeatures(axes)(prompts, texts), judges, axes),
              "design": agreement(design_features(rounds, axes), judges, axes)}
    if axes == AXES:  # the ceiling's model is the P-Soups users' three-axis majority
        rates = [record["design"][axis.name]["agree"] for axis in AXES]
        record["ideal"] = [ideal_sides_right(rates, n) for n in (2, 4, 8, 16, 32)]
    if args.persrm_pairs:
        n = 2 * args.persrm_pairs
        began = time.perf_counter()
        scored = persrm_features(prompts[:n], texts[:n], axes)
        record["persrm"] = {**agreement(scored, judges[:n], axes),
                            "seconds_per_answer": round((time.perf_counter() - began) / n, 3)}
    write_json_atomic(args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
