"""``padlm train``: the PersRM (PAD's stages), the orchestration experts and their PCM.

The options that set a training config's fields are generated from those fields
(:mod:`padlm.cli.fields`): their configs live in torch-free modules
(:mod:`padlm.training.configs`, :mod:`padlm.orchestration.configs`), as the command tree is
built on every start, ``padlm --help`` included.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from padlm.cli.fields import FieldOptions, config_options
from padlm.cli.options import DtypeOption, ModelOption, invocation
from padlm.errors import PadlmError
from padlm.orchestration.configs import PCMTrainConfig
from padlm.server.settings import split_list
from padlm.training.configs import HeadTrainingConfig, TrainConfig

app = typer.Typer(help="Train personalization models.", no_args_is_help=True)
PSOUPS_DIMENSIONS = "P1A,P1B,P2A,P2B,P3A,P3B"
CONTEXT_HELP = ("What each expert reads: dimension (its own dimension's text) or request (the "
                "request's whole preference, as soups reads it).")
DEFAULT_DATA = Path("data/persrm_pairs.jsonl")


# the dimension lists are comma lists on the command line, as `padlm eval --preferences`
DIMENSION_LISTS = {"holdout_dimensions": split_list, "dimensions": split_list}
PERSRM_RUN = FieldOptions(TrainConfig, (
    "data", "out", "stage", "holdout_dimensions", "dimensions", "label_filter",
    "recommended_weight", "top_k", "placement", "lora_steps", "lora_rank", "cache_dir",
    "strict"), names={"recommended_weight": "weight"}, parsers=DIMENSION_LISTS)
PERSRM_HEAD = FieldOptions(HeadTrainingConfig, (
    "beta", "epochs", "lr", "form", "rank", "identity_l2", "nll_weight", "dimension_balance",
    "vocab", "reference", "seed"))


@app.command("persrm")
@config_options(run=PERSRM_RUN, head=PERSRM_HEAD)
def train_persrm(
    run: dict[str, Any],
    head: dict[str, Any],
    model: ModelOption = "default",
    dtype: DtypeOption = None,
) -> None:
    """Train a PersRM (PAD's stages): a value head on cached states, optionally after LoRA."""
    from padlm.core.models import load_model
    from padlm.training.pipeline import run_training

    if not run["data"].exists():
        raise PadlmError(f"data file {run['data']} does not exist")
    config = TrainConfig(**run, head=HeadTrainingConfig(**head), command=invocation())
    persrm = run_training(load_model(model, dtype=dtype), config)
    summary = persrm.config.training["validation"]
    typer.echo(json.dumps({"out": str(config.out), "validation": summary,
                           "head_training_seconds":
                               persrm.config.training["head_training_seconds"]}, indent=1))


def _threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise PadlmError("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)


# The head's form is `--head-form`: `--form` is the experts' own (prompted | head | lora |
# models). The experts decode (mix, soups), so their heads default to the PersRM recipe of
# docs/training.md rather than the head trainer's plain DPO: 15 epochs, an NLL term (a head
# trained without one can rank pairs well and still stop ending answers) and a light pull
# toward the identity.
EXPERTS_HEAD = FieldOptions(HeadTrainingConfig, (
    "epochs", "beta", "lr", "form", "rank", "nll_weight", "identity_l2", "seed"),
    names={"form": "head_form"}, defaults={"epochs": 15, "nll_weight": 0.1, "identity_l2": 0.01})
EXPERTS_RUN = FieldOptions(TrainConfig, ("lora_steps", "lora_rank", "placement", "cache_dir"))


@app.command("experts")
@config_options(head=EXPERTS_HEAD, run=EXPERTS_RUN)
def train_experts(
    *,
    out: Annotated[Path, typer.Option(help="Output experts directory.")],
    form: Annotated[str, typer.Option(help="prompted | head | lora | models")] = "head",
    data: Annotated[Path, typer.Option(help="Preference JSONL (head, lora).")] = DEFAULT_DATA,
    dimensions: Annotated[str, typer.Option(help="Comma list; one expert each.")
                          ] = PSOUPS_DIMENSIONS,
    models: Annotated[str | None, typer.Option(
        help="form models: comma list of HF ids or directories, one per dimension.")] = None,
    head: dict[str, Any],
    run: dict[str, Any],
    context: Annotated[str, typer.Option(help=CONTEXT_HELP)] = "dimension",
    model: ModelOption = "default",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Train one expert per preference dimension (MoPE's frozen experts)."""
    from padlm.core.models import load_model
    from padlm.orchestration.experts import (
        FORMS,
        check_context,
        model_experts,
        prompted_experts,
    )

    if form not in FORMS:
        raise PadlmError(f"unknown experts form {form!r}; choose {', '.join(FORMS)}")
    check_context(form, context)
    dims = split_list(dimensions)
    if not dims:
        raise PadlmError("--dimensions names no dimension")
    if form in ("head", "lora") and not data.exists():
        raise PadlmError(f"data file {data} does not exist")
    if form == "models" and not models:
        raise PadlmError("--form models needs --models, one per dimension")
    _threads(threads)
    lm = load_model(model)
    if form == "prompted":
        experts = prompted_experts(lm, dims, run["placement"], context)
        experts.save(out)
    elif form == "models":
        experts = model_experts(lm, split_list(models), dims, run["placement"], context)
        experts.save(out)
    else:
        from padlm.orchestration.train_experts import train_head_experts, train_lora_experts

        base = TrainConfig(data=data, out=out, head=HeadTrainingConfig(**head), **run,
                           command=invocation())
        trainer = train_head_experts if form == "head" else train_lora_experts
        experts = trainer(lm, base, dims, context)
    summary = {dim: info.get("validation", {}).get("all", {}).get("head", {}).get("accuracy")
               for dim, info in experts.config.training.get("per_dimension", {}).items()}
    typer.echo(json.dumps({"out": str(out), "form": form, "dimensions": list(dims),
                           "validation_accuracy": summary}, indent=1))


# `--data` defaults to the repository's pairs, as `train experts` does; a Python caller of the
# config names its files
PCM = FieldOptions(PCMTrainConfig, (
    "out", "steps", "data", "prompts_per_step", "max_new_tokens", "eta", "lr",
    "updates_per_step", "width", "eval_per_combination", "checkpoint_every", "pool_dir",
    "seed"), defaults={"data": [DEFAULT_DATA]})


@app.command("pcm")
@config_options(pcm=PCM)
def train_pcm(
    *,
    experts: Annotated[Path, typer.Option(help="Experts directory (padlm train experts).")],
    pcm: dict[str, Any],
    context: Annotated[str | None, typer.Option(
        help=CONTEXT_HELP + " Default: the experts' own; the output keeps it.")] = None,
    model: ModelOption = "default",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Train the Preference Control Model with REBEL on rollouts of the mixture itself."""
    from padlm.core.models import load_model
    from padlm.orchestration.experts import load_experts
    from padlm.orchestration.train_pcm import PCMTrainer

    for path in pcm["data"]:
        if not path.exists():
            raise PadlmError(f"data file {path} does not exist")
    config = PCMTrainConfig(**pcm, command=invocation()).validate()
    _threads(threads)
    loaded = load_experts(experts, load_model(model))
    if context is not None:  # the config refuses a context its form cannot use
        loaded.config = replace(loaded.config, context=context)
    trainer = PCMTrainer(loaded, config)
    trained = trainer.train().pcm
    training = trained.config.training
    typer.echo(json.dumps({"out": str(config.out), "parameters": training["parameters"],
                           "reward_before": training["before"].get("reward"),
                           "reward_after": training["after"].get("reward"),
                           "seconds": training["seconds"]}, indent=1))


@app.command("rewards")
def train_dimension_rewards(
    *,
    dimensions: Annotated[str, typer.Option(
        help="Comma list of dimensions (sides), one reward head each, e.g. bullets,prose.")],
    out: Annotated[Path, typer.Option(help="Directory for rewards.safetensors and "
                                           "rewards.json (held-out accuracy, the command).")],
    data: Annotated[list[Path] | None, typer.Option(
        help="Preference pairs (JSONL, repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Per-dimension Bradley-Terry reward heads on MiniLM embeddings (what the PCM's reward and
    profiles' per-axis features read), each fitted on its dimension's pairs and scored on
    the prompt-level validation split."""
    from padlm.atomic import write_json_atomic
    from padlm.data.axes import HELD_OUT_DIMENSIONS
    from padlm.data.schema import load_rows
    from padlm.orchestration.rewards import train_rewards

    names = split_list(dimensions)
    held_out = [name for name in names if name in HELD_OUT_DIMENSIONS]
    if not names or held_out:
        raise PadlmError(f"--dimensions {', '.join(held_out)} are held out of training (the "
                         "unseen-preference test)" if held_out else "--dimensions is empty",
                         param="dimensions")
    paths = data or [DEFAULT_DATA]
    for path in paths:
        if not path.exists():
            raise PadlmError(f"data file {path} does not exist", param="data")
    _threads(threads)
    rewards = train_rewards([row for path in paths for row in load_rows(path)[0]], names)
    out.mkdir(parents=True, exist_ok=True)
    rewards.write(out)
    record = {"command": invocation(), "data": [str(path) for path in paths],
              "metrics": rewards.metrics}
    write_json_atomic(out / "rewards.json", record)
    typer.echo(json.dumps(record, indent=1))
