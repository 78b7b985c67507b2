"""Summarize trained PersRM directories side by side: the validation accuracies that decide a
head recipe (the six P-Soups sides, every seen dimension, harmless, the unseen axes), the
untrained head (= Linear Alignment's reward) beside each, and the command that trained it.

Reads only each PersRM's saved ``config.json`` (its training record), so it runs in a second
and reproduces a recipe table without retraining:

    .venv/bin/python scripts/persrm_recipes.py --out reports/persrm_teacher_recipes.json \\
        --what "..." "name=.runs/t3-nll0" "name2=.runs/t3-nll01"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from padlm.atomic import write_json_atomic
from padlm.data.axes import HELD_OUT_DIMENSIONS
from padlm.preferences import PSOUPS


def recipe_row(directory: Path) -> dict:
    """One PersRM's row: its training command and validation accuracies (all pairs)."""
    training = json.loads((directory / "config.json").read_text())["training"]
    validation = training["validation"]["all"]
    row: dict = {"command": training["command"],
                 "train_pairs": training["counts"]["train_pairs"],
                 "head_training_seconds": training["head_training_seconds"]}
    for suffix, report in (("", validation["head"]), ("_untrained", validation["untrained_head"])):
        accuracy = {dim: value["accuracy"] for dim, value in report["per_dimension"].items()}
        seen = [value for dim, value in accuracy.items() if dim not in HELD_OUT_DIMENSIONS]
        unseen = [accuracy[dim] for dim in HELD_OUT_DIMENSIONS if dim in accuracy]
        row[f"psoups_mean{suffix}"] = round(mean(accuracy[dim] for dim in PSOUPS), 4)
        row[f"seen_dimensions_mean{suffix}"] = round(mean(seen), 4)
        row[f"harmless{suffix}"] = accuracy.get("harmless")
        row[f"all_pairs{suffix}"] = report["accuracy"]
        row[f"unseen_mean{suffix}"] = round(mean(unseen), 4) if unseen else None
        row[f"per_dimension{suffix}"] = accuracy
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR, one per trained PersRM")
    parser.add_argument("--what", required=True, help="what the table compares, and the rule")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"expected NAME=DIR, got {spec!r}")
        runs[name] = recipe_row(Path(directory))
    write_json_atomic(args.out, {"what": args.what, "runs": runs})
    for name, row in runs.items():
        print(f"{name:40s} P-Soups {row['psoups_mean']:.3f} seen "
              f"{row['seen_dimensions_mean']:.3f} harmless {row['harmless']:.3f}")


if __name__ == "__main__":
    main()
