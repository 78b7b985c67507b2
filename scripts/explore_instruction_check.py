"""Do explore pairs differ more when each side carries the data sampler's instruction?

Decodes, for training-pool prompts the feedback simulation's rounds do not use (self-instruct
in the simulation's seeded order, after its first 32), the all-A and all-B P-Soups pair twice:
with the sides' preset texts, and with each text followed by its stronger instruction
(:func:`padlm.data.axes.generation_text`, what ``padlm.explore`` now decodes). For each axis
it counts the pairs in which the simulated user's judge moves the intended way (side A's
answer further to side A). Never reads ``koala_eval_50``.

    python scripts/explore_instruction_check.py \
        --out reports/profiles/explore-instruction-check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from padlm.atomic import write_json_atomic
from padlm.core.config import GenerationConfig
from padlm.core.engine import Personalizer
from padlm.data.pools import default_pool_dir
from padlm.evaluation.feedback import decode, judge_scores, training_prompts
from padlm.judges import primary_direction
from padlm.profiles.features import AXES
from padlm.profiles.profile import compose

ROUNDS = 32  # the simulation's default rounds: these prompts are its, so skipped


def intended_share(prompts: list[str], texts: list[str]) -> dict[str, float]:
    """Per axis, the share of (all-A, all-B) pairs whose judge difference points to A."""
    scores = judge_scores([p for p in prompts for _ in (0, 1)], texts)
    out = {}
    for axis in AXES:
        judge, sign = primary_direction(axis.a.id)
        moved = [sign * (scores[2 * i][judge] - scores[2 * i + 1][judge]) > 0
                 for i in range(len(prompts))]
        out[axis.name] = round(sum(moved) / len(moved), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pool = training_prompts(default_pool_dir(), ROUNDS + args.prompts, seed=0)
    prompts = [item["prompt"] for item in pool[ROUNDS:]]
    engine = Personalizer("default")
    config = GenerationConfig(max_new_tokens=64, no_repeat_ngram_size=3)
    sides = ([axis.a.id for axis in AXES], [axis.b.id for axis in AXES])
    record = {"prompts": len(prompts), "strategy": "pad", "model": engine.lm.name}
    for name, instructed in (("preset", False), ("instructed", True)):
        pair = [compose(s, None, instructed=instructed) for s in sides]
        texts = decode(engine, "pad", [(p, x) for p in prompts for x in pair], config, 16)
        record[name] = intended_share(prompts, texts)
    write_json_atomic(args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
