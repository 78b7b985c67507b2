"""Summarize trained PersRM directories side by side: the validation accuracies that decide a
head recipe (the six P-Soups sides, every seen dimension, harmless, the unseen axes), the
untrained head (= Linear Alignment's reward) beside each, and the command that trained it.

Reads each PersRM's saved ``config.json`` (its training record), so it runs in a second and
reproduces a recipe table without retraining. The end-of-turn log-prob (does the head still
end answers?) is read from the record where training saved it; ``--data`` computes it for
older records from the hidden-state cache of the data they were trained on (a minute or two):

    .venv/bin/python scripts/persrm_recipes.py --out reports/persrm_teacher_recipes.json \\
        --what "..." "name=.runs/t3-nll0" "name2=.runs/t3-nll01" [--data PAIRS.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import torch

from padlm.atomic import write_json_atomic
from padlm.core.preferences import PSOUPS
from padlm.data.axes import HELD_OUT_DIMENSIONS


def recipe_row(directory: Path) -> dict:
    """One PersRM's row: its training command and validation accuracies (all pairs)."""
    training = json.loads((directory / "config.json").read_text())["training"]
    validation = training["validation"]["all"]
    row: dict = {"command": training["command"],
                 "train_pairs": training["counts"]["train_pairs"],
                 "head_training_seconds": training["head_training_seconds"]}
    if "end_of_turn" in training["validation"]:
        row["end_of_turn"] = training["validation"]["end_of_turn"]
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


def end_of_turn_rows(data: Path, directories: dict[str, Path]) -> dict[str, dict]:
    """The end-of-turn report of each PersRM and of the untrained head on ``data``'s validation
    pairs (its prompt-level split), from the hidden-state cache training filled."""
    from padlm.core.models import load_model
    from padlm.core.persrm import PersonalizedRewardModel
    from padlm.training.cache import weights_sha256
    from padlm.training.configs import HeadTrainingConfig, TrainConfig
    from padlm.training.head import end_of_turn_report
    from padlm.training.pipeline import prepare

    lm = load_model("default")
    lm_head = lm.model.get_output_embeddings().weight.detach().float()
    eos = lm.tokenizer.eos_token_id
    reports, validations = {}, {}
    for name, directory in directories.items():
        persrm = PersonalizedRewardModel.load(directory)
        key = (persrm.config.placement, persrm.config.top_k, persrm.config.reference)
        if key not in validations:  # PersRMs that share a cache share one load of it
            config = TrainConfig(data=data, out=directory, label_filter="none",
                                 placement=key[0], top_k=key[1],
                                 head=HeadTrainingConfig(reference=key[2]))
            validations[key] = prepare(lm, config, model_sha=weights_sha256(lm.model)
                                       ).val_states
        validation = validations[key]
        reports[name] = {"head": end_of_turn_report(persrm.head, validation, lm_head, "topk",
                                                    eos),
                         "untrained_head": end_of_turn_report(None, validation, lm_head,
                                                              "topk", eos)}
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR, one per trained PersRM")
    parser.add_argument("--what", required=True, help="what the table compares, and the rule")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="compute the end-of-turn report on this data's validation pairs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    directories = {}
    for spec in args.runs:
        name, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"expected NAME=DIR, got {spec!r}")
        directories[name] = Path(directory)
    runs = {name: recipe_row(directory) for name, directory in directories.items()}
    if args.data is not None:
        for name, report in end_of_turn_rows(args.data, directories).items():
            runs[name]["end_of_turn"] = report
    write_json_atomic(args.out, {"what": args.what, "runs": runs})
    for name, row in runs.items():
        ends = row.get("end_of_turn", {}).get("head", {}).get("mean_logp")
        print(f"{name:40s} P-Soups {row['psoups_mean']:.3f} seen "
              f"{row['seen_dimensions_mean']:.3f} harmless {row['harmless']:.3f} "
              f"end-of-turn log-prob {ends}")


if __name__ == "__main__":
    main()
