"""Held-out mixture reward of several PCMs on one footing: the same experts, the same held-out
(prompt, combination) pairs and the same reward models.

A PCM training run reports its reward before and after, but under the reward models it was
trained with; comparing a new PCM with an older one needs the older one scored under the new
reward models, on the new run's held-out pairs. This loads the new run's reward models
(``RUN/pcm/rewards.safetensors``) and its settings, rebuilds its held-out pairs (Self-Instruct
and HH-RLHF validation prompts, never ``koala_eval_50``) and scores greedy mixture responses
with: the untrained PCM (uniform weights), every ``--pcm`` directory given, and the run's own.

    .venv/bin/python scripts/pcm_heldout_reward.py --run .runs/pcm-union \
        --pcm src/padlm/assets/orchestration-default --out reports/pcm_union_heldout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from padlm.atomic import write_json_atomic
from padlm.core.models import load_model
from padlm.orchestration.configs import PCMTrainConfig
from padlm.orchestration.experts import PCM_DIR, load_experts
from padlm.orchestration.pcm import PreferenceControlModel
from padlm.orchestration.rewards import DimensionRewards
from padlm.orchestration.train_pcm import PCMTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a `padlm train pcm` output")
    parser.add_argument("--pcm", type=Path, action="append", default=[],
                        help="another experts directory whose PCM to score (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    lm = load_model("default")
    experts = load_experts(args.run, lm)
    trained = experts.pcm
    settings = dict(trained.config.training["config"])
    settings["data"] = tuple(Path(p) for p in settings["data"])
    config = PCMTrainConfig(out=args.run, steps=1, **settings)
    trainer = PCMTrainer(experts, config, DimensionRewards.load(args.run / PCM_DIR))
    results = {"run": str(args.run), "pairs": len(trainer.eval_set),
               "untrained": trainer.evaluate()}
    for directory in args.pcm:
        trainer.pcm.load_state_dict(PreferenceControlModel.load(directory / PCM_DIR).state_dict())
        results[str(directory)] = trainer.evaluate()
    trainer.pcm.load_state_dict(trained.state_dict())
    results[str(args.run)] = trainer.evaluate()
    write_json_atomic(args.out, results)
    print(json.dumps({name: value["reward"] for name, value in results.items()
                      if isinstance(value, dict)}, indent=1))


if __name__ == "__main__":
    main()
