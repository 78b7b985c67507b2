"""The PersRM head-recipe ablation behind ``reports/persrm_ablation.md``.

One hidden-state cache (the default data, frozen SmolLM2-135M-Instruct), then a small grid of
head-training recipes, each evaluated by prompt-level k-fold cross-validation (every prompt
is validated once, by a head that never saw it; the margins are pooled): pairwise
accuracy per dimension (implicit reward of chosen > rejected), on all validation pairs and
on the "clean" ones (those passing the self-consistency filter), next to the untrained
baseline (frozen preference-conditioned model's mean token log-prob) and the training time.

    .venv/bin/python scripts/persrm_ablation.py --data data/persrm_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from padlm.atomic import write_json_atomic, write_text_atomic
from padlm.core.models import load_model
from padlm.training.cache import weights_sha256
from padlm.training.configs import HeadTrainingConfig, TrainConfig
from padlm.training.head import (
    accuracy_report,
    baseline_margins,
    reward_margins,
    train_head,
)
from padlm.training.pipeline import prepare

VARIANTS = [
    # name, head overrides, pipeline overrides
    ("lowrank r16, beta 0.1, lr 1e-3 (base recipe)", {}, {}),
    ("full d x d, lr 1e-4", {"form": "full", "lr": 1e-4}, {}),
    ("full d x d, lr 1e-3", {"form": "full", "lr": 1e-3}, {}),
    ("diagonal, lr 1e-2", {"form": "diagonal", "lr": 1e-2}, {}),
    ("lowrank r4", {"rank": 4}, {}),
    ("lowrank, beta 0.02", {"beta": 0.02}, {}),
    ("lowrank, beta 0.5", {"beta": 0.5}, {}),
    ("lowrank, lr 1e-4", {"lr": 1e-4}, {}),
    ("lowrank, lr 1e-2", {"lr": 1e-2}, {}),
    ("lowrank, identity L2 1e-2", {"identity_l2": 1e-2}, {}),
    ("lowrank, DPO + NLL 0.1", {"nll_weight": 0.1}, {}),
    ("lowrank, no label filter", {}, {"label_filter": "none"}),
    ("lowrank, half the training pairs", {}, {"fraction": 0.5}),
    ("lowrank, full-vocabulary log-probs", {"vocab": "full"}, {}),
    ("lowrank, without P3A/P3B (unseen axis)", {}, {"holdout_dimensions": ("P3A", "P3B")}),
    ("lowrank, DPO + NLL 0.1 + identity L2 1e-2",
     {"nll_weight": 0.1, "identity_l2": 1e-2}, {}),
    # the reward's reference is the base model WITHOUT the preference (an untrained head is
    # then Linear Alignment's implicit reward: the preference's PMI with each token)
    ("unconditioned reference, untrained head (W = I: Linear Alignment)",
     {"reference": "unconditioned"}, {"untrained": True}),
    ("unconditioned reference, lowrank r16", {"reference": "unconditioned"}, {}),
    ("unconditioned, DPO + NLL 0.1 + identity L2 1e-2 (shipped recipe)",
     {"reference": "unconditioned", "nll_weight": 0.1, "identity_l2": 1e-2}, {}),
    ("unconditioned, full d x d, lr 1e-4", {"reference": "unconditioned", "form": "full",
                                            "lr": 1e-4}, {}),
    ("unconditioned, beta 0.02", {"reference": "unconditioned", "beta": 0.02}, {}),
    ("unconditioned, no label filter", {"reference": "unconditioned"}, {"label_filter": "none"}),
    ("unconditioned, NLL + L2 (shipped recipe), without P3A/P3B (unseen axis)",
     {"reference": "unconditioned", "nll_weight": 0.1, "identity_l2": 1e-2},
     {"holdout_dimensions": ("P3A", "P3B")}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("data/persrm_pairs.jsonl"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", default="", help="comma list of variant indexes")
    parser.add_argument("--out", type=Path, default=Path("reports/persrm_ablation.json"))
    parser.add_argument("--markdown", type=Path, default=Path("reports/persrm_ablation.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    lm = load_model("default")
    sha = weights_sha256(lm.model)
    lm_head = lm.model.get_output_embeddings().weight.detach().float()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    chosen = [int(i) for i in args.only.split(",") if i.strip()] or range(len(VARIANTS))
    for index in chosen:
        name, head_over, pipe_over = VARIANTS[index]
        pipe_over = dict(pipe_over)
        fraction = pipe_over.pop("fraction", 1.0)
        untrained = pipe_over.pop("untrained", False)
        head = replace(HeadTrainingConfig(epochs=args.epochs), **head_over)
        pooled = {"head": [], "baseline": [], "dims": [], "clean": []}
        seconds, train_pairs, losses = 0.0, 0, []
        for fold in range(args.folds):
            config = TrainConfig(data=args.data, out=Path("/dev/null"), head=head,
                                 fold=(fold, args.folds), **pipe_over)
            data = prepare(lm, config, model_sha=sha)
            pairs = data.train_states[:int(len(data.train_states) * fraction)]
            began = time.perf_counter()
            trained, history = (None, [{"loss": float("nan")}]) if untrained else train_head(
                pairs, lm_head, head)
            seconds += time.perf_counter() - began
            train_pairs += 0 if untrained else len(pairs)
            losses.append(history[-1]["loss"])
            pooled["head"].append(reward_margins(trained, data.val_states, lm_head, head.vocab,
                                                 head.reference))
            pooled["baseline"].append(baseline_margins(data.val_states))
            pooled["dims"] += [r.dimension for r in data.val_rows]
            pooled["clean"] += data.val_clean
        reports = {}
        for split, keep in (("all", [True] * len(pooled["dims"])), ("clean", pooled["clean"])):
            idx = torch.tensor([i for i, k in enumerate(keep) if k])
            dims = [pooled["dims"][i] for i in idx.tolist()]
            reports[split] = {
                "head": accuracy_report(torch.cat(pooled["head"])[idx], dims),
                "baseline_mean_logprob": accuracy_report(torch.cat(pooled["baseline"])[idx],
                                                         dims)}
        results[name] = {"head": head_over, "pipeline": {**pipe_over, "fraction": fraction},
                         "train_pairs": round(train_pairs / args.folds),
                         "train_seconds": round(seconds / args.folds, 1),
                         "final_train_loss": round(sum(losses) / len(losses), 4),
                         "validation": reports}
        logging.info("%s: %s", name, {k: v["head"]["accuracy_mean_over_dimensions"]
                                       for k, v in reports.items()})
        write_json_atomic(args.out, results)
    write_text_atomic(args.markdown, render(results, args))


def render(results: dict, args) -> str:
    names = [v[0] for v in VARIANTS if v[0] in results]
    dims = sorted({d for r in results.values()
                   for d in r["validation"]["all"]["head"]["per_dimension"]})
    lines = [
        "# PersRM head ablation",
        "",
        "Frozen SmolLM2-135M-Instruct backbone, value head trained with DPO (reference = the "
        "base model, seeing the preference unless the recipe says `unconditioned`)"
        f" on cached hidden states, {args.epochs} epochs, data `{args.data}`; {args.folds}-fold "
        "cross-validation by prompt (each prompt validated once by a head that never saw it; "
        "train pairs / seconds are per fold). Accuracy = implicit reward of chosen > rejected "
        "(ties = 0.5). "
        "`all` = every validation pair, `clean` = pairs passing the self-consistency filter. "
        "Baseline = frozen preference-conditioned model's mean token log-prob.",
        "",
        "Regenerate: `.venv/bin/python scripts/persrm_ablation.py --data "
        f"{args.data} --epochs {args.epochs} --folds {args.folds} --only "
        + ",".join(str(i) for i, v in enumerate(VARIANTS) if v[0] in results) + "`",
        "",
    ]
    first = results[names[0]]["validation"]
    for split in ("all", "clean"):
        if split not in first:
            continue
        lines += [f"## Validation: {split} pairs", "",
                  "| recipe | train pairs | train s | mean over dims | " + " | ".join(dims)
                  + " |", "|---" * (4 + len(dims)) + "|"]
        base = first[split]["baseline_mean_logprob"]
        lines.append("| untrained baseline (mean log-prob) | - | - | "
                     f"{base['accuracy_mean_over_dimensions']:.3f} | " + " | ".join(
                         f"{base['per_dimension'].get(d, {}).get('accuracy', float('nan')):.3f}"
                         for d in dims) + " |")
        for name in names:
            r = results[name]
            v = r["validation"].get(split)
            if not v:
                continue
            per = v["head"]["per_dimension"]
            lines.append(
                f"| {name} | {r['train_pairs']} | {r['train_seconds']} | "
                f"{v['head']['accuracy_mean_over_dimensions']:.3f} | "
                + " | ".join(f"{per.get(d, {}).get('accuracy', float('nan')):.3f}"
                             for d in dims) + " |")
        pairs = first[split]["head"]["per_dimension"]
        lines += ["", "Validation pairs per dimension: " + ", ".join(
            f"{d} {pairs[d]['pairs']}" for d in dims if d in pairs), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
