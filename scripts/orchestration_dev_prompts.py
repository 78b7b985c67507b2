"""Write the orchestration development prompts: where expert and PCM designs are compared
before any ``koala_eval_50`` number is looked at.

The prompts are the Self-Instruct validation-split prompts that ``persrm_separation.py`` does
not evaluate on, then HH-RLHF validation-split first turns by id, up to ``--count``. The PCM
trainer samples its rollouts from the training split only, so no PCM has seen them.

    python scripts/orchestration_dev_prompts.py --out reports/orchestration_dev/prompts.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padlm.atomic import write_json_atomic
from padlm.data.pools import (
    default_pool_dir,
    held_out_self_instruct,
    hh_first_turn_prompts,
    self_instruct_prompts,
)
from padlm.data.splits import is_validation

SEPARATION_PROMPTS = 50  # what persrm_separation.py's acceptance run evaluates on


def development_prompts(directory: Path, count: int) -> list[dict[str, str]]:
    separation = {p.id for p in held_out_self_instruct(directory)[:SEPARATION_PROMPTS]}
    self_instruct = [p for p in sorted(self_instruct_prompts(directory), key=lambda p: p.id)
                     if is_validation(p.prompt) and p.id not in separation]
    hh = sorted((p for p in hh_first_turn_prompts(directory) if is_validation(p.prompt)),
                key=lambda p: p.id)
    chosen = (self_instruct + hh)[:count]
    return [{"id": p.id, "prompt": p.prompt, "source": p.source} for p in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--pool-dir", type=Path, default=None)
    args = parser.parse_args()
    prompts = development_prompts(args.pool_dir or default_pool_dir(), args.count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, prompts)
    print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
