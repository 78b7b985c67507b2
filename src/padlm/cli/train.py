"""``padlm train``: the PersRM (PAD's stages), the orchestration experts and their PCM.

The options of ``persrm`` and ``experts`` restate the fields of
:class:`padlm.training.head.HeadTrainingConfig` and :class:`padlm.training.pipeline.TrainConfig`
instead of being generated from them (:mod:`padlm.cli.fields`): those modules import torch,
and the command tree is built on every start, ``padlm --help`` included (0.3 s, against 4 s
with torch and transformers). ``tests/test_cli_defaults.py`` holds the defaults equal.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli.options import (
    DtypeOption,
    ModelOption,
    PlacementOption,
    invocation,
)
from padlm.errors import PadlmError
from padlm.server.settings import split_list

app = typer.Typer(help="Train personalization models.", no_args_is_help=True)
PSOUPS_DIMENSIONS = "P1A,P1B,P2A,P2B,P3A,P3B"
CONTEXT_HELP = ("What each expert reads: dimension (its own dimension's text) or request (the "
                "request's whole preference, as soups reads it).")
DEFAULT_DATA = Path("data/persrm_pairs.jsonl")


@app.command("persrm")
def train_persrm(
    data: Annotated[Path, typer.Option(help="Preference JSONL (padlm data build).")],
    out: Annotated[Path, typer.Option(help="Output PersRM directory.")],
    stage: Annotated[str, typer.Option(help="head | lora | both")] = "head",
    beta: Annotated[float, typer.Option()] = 0.1,
    epochs: Annotated[int, typer.Option()] = 5,
    lr: Annotated[float, typer.Option()] = 1e-3,
    form: Annotated[str, typer.Option(help="full | lowrank | diagonal")] = "lowrank",
    rank: Annotated[int, typer.Option()] = 16,
    identity_l2: Annotated[float, typer.Option(help="L2 pull of W, b toward I, 0.")] = 0.0,
    nll_weight: Annotated[float, typer.Option(help="Weight of an NLL term (chosen).")] = 0.0,
    dimension_balance: Annotated[float, typer.Option(
        help="Per-pair loss weight n_dim^-b, 0..1: 0 every pair alike, 1 every dimension "
             "alike (human pairs then stop outweighing each teacher axis).")] = 0.0,
    vocab: Annotated[str, typer.Option(help="topk | full (log-prob normalisation)")] = "topk",
    reference: Annotated[str, typer.Option(
        help="conditioned (the reward's reference base model sees the preference, as in "
             "PAD's code; one stream at decoding) | unconditioned (it does not: an untrained "
             "head is Linear Alignment; a second stream at decoding)")] = "conditioned",
    holdout_dimensions: Annotated[str | None, typer.Option(
        help="Comma list of dimensions left out of training (e.g. P3A,P3B).")] = None,
    dimensions: Annotated[str | None, typer.Option(help="Only these dimensions.")] = None,
    label_filter: Annotated[str, typer.Option(help="consistency | none")] = "consistency",
    weight: Annotated[float, typer.Option(help="recommended_weight saved in the config.")
                      ] = 1.0,
    top_k: Annotated[int, typer.Option()] = 10,
    placement: PlacementOption = "user-prefix",
    lora_steps: Annotated[int, typer.Option()] = 100,
    lora_rank: Annotated[int, typer.Option()] = 16,
    cache_dir: Annotated[Path | None, typer.Option(help="Hidden-state cache root.")] = None,
    model: ModelOption = "default",
    dtype: DtypeOption = None,
    strict: Annotated[bool, typer.Option(help="Any bad data row is fatal.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a PersRM (PAD's stages): a value head on cached states, optionally after LoRA."""
    from padlm.core.models import load_model
    from padlm.training.head import HeadTrainingConfig
    from padlm.training.pipeline import TrainConfig, run_training

    if not data.exists():
        raise PadlmError(f"data file {data} does not exist")
    head = HeadTrainingConfig(form=form, rank=rank, beta=beta, lr=lr, epochs=epochs,
                              identity_l2=identity_l2, nll_weight=nll_weight, vocab=vocab,
                              reference=reference, dimension_balance=dimension_balance,
                              seed=seed)
    config = TrainConfig(
        data=data, out=out, stage=stage, head=head,
        holdout_dimensions=split_list(holdout_dimensions), dimensions=split_list(dimensions),
        label_filter=label_filter, placement=placement, top_k=top_k,
        recommended_weight=weight, cache_dir=cache_dir, strict=strict, lora_steps=lora_steps,
        lora_rank=lora_rank, command=invocation(),
    )
    persrm = run_training(load_model(model, dtype=dtype), config)
    summary = persrm.config.training["validation"]
    typer.echo(json.dumps({"out": str(out), "validation": summary,
                           "head_training_seconds":
                               persrm.config.training["head_training_seconds"]}, indent=1))

def _threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise PadlmError("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)


@app.command("experts")
def train_experts(
    out: Annotated[Path, typer.Option(help="Output experts directory.")],
    form: Annotated[str, typer.Option(help="prompted | head | lora | models")] = "head",
    data: Annotated[Path, typer.Option(help="Preference JSONL (head, lora).")] = DEFAULT_DATA,
    dimensions: Annotated[str, typer.Option(help="Comma list; one expert each.")
                          ] = PSOUPS_DIMENSIONS,
    models: Annotated[str | None, typer.Option(
        help="form models: comma list of HF ids or directories, one per dimension.")] = None,
    epochs: Annotated[int, typer.Option()] = 15,
    beta: Annotated[float, typer.Option()] = 0.1,
    lr: Annotated[float, typer.Option()] = 1e-3,
    head_form: Annotated[str, typer.Option(help="full | lowrank | diagonal")] = "lowrank",
    rank: Annotated[int, typer.Option()] = 16,
    nll_weight: Annotated[float, typer.Option()] = 0.1,
    identity_l2: Annotated[float, typer.Option()] = 0.01,
    lora_steps: Annotated[int, typer.Option()] = 100,
    lora_rank: Annotated[int, typer.Option()] = 16,
    placement: PlacementOption = "user-prefix",
    context: Annotated[str, typer.Option(help=CONTEXT_HELP)] = "dimension",
    cache_dir: Annotated[Path | None, typer.Option(help="Hidden-state cache root.")] = None,
    model: ModelOption = "default",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train one expert per preference dimension (MoPE's frozen experts)."""
    from padlm.core.models import load_model
    from padlm.orchestration.experts import (
        FORMS,
        check_context,
        model_experts,
        prompted_experts,
    )
    from padlm.training.head import HeadTrainingConfig
    from padlm.training.pipeline import TrainConfig

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
        experts = prompted_experts(lm, dims, placement, context)
        experts.save(out)
    elif form == "models":
        experts = model_experts(lm, split_list(models), dims, placement, context)
        experts.save(out)
    else:
        from padlm.orchestration.train_experts import train_head_experts, train_lora_experts

        head = HeadTrainingConfig(form=head_form, rank=rank, beta=beta, lr=lr, epochs=epochs,
                                  identity_l2=identity_l2, nll_weight=nll_weight,
                                  seed=seed)
        base = TrainConfig(data=data, out=out, head=head, placement=placement,
                           cache_dir=cache_dir, lora_steps=lora_steps, lora_rank=lora_rank,
                           command=invocation())
        trainer = train_head_experts if form == "head" else train_lora_experts
        experts = trainer(lm, base, dims, context)
    summary = {dim: info.get("validation", {}).get("all", {}).get("head", {}).get("accuracy")
               for dim, info in experts.config.training.get("per_dimension", {}).items()}
    typer.echo(json.dumps({"out": str(out), "form": form, "dimensions": list(dims),
                           "validation_accuracy": summary}, indent=1))


@app.command("pcm")
def train_pcm(
    experts: Annotated[Path, typer.Option(help="Experts directory (padlm train experts).")],
    out: Annotated[Path, typer.Option(help="Output: the experts plus the PCM in pcm/.")],
    steps: Annotated[int, typer.Option(help="REBEL steps.")] = 100,
    data: Annotated[list[Path] | None, typer.Option(
        help="Preference JSONL for the reward models; repeat to fit them on several files "
             f"(default {DEFAULT_DATA}).")] = None,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step (2 samples each).")
                                ] = 4,
    max_new_tokens: Annotated[int, typer.Option()] = 48,
    eta: Annotated[float, typer.Option(help="REBEL's step size.")] = 1.0,
    lr: Annotated[float, typer.Option()] = 3e-3,
    updates_per_step: Annotated[int, typer.Option()] = 4,
    width: Annotated[int, typer.Option(help="PCM hidden width.")] = 64,
    eval_per_combination: Annotated[int, typer.Option(
        help="Held-out prompts per combination for the reward before/after.")] = 2,
    checkpoint_every: Annotated[int, typer.Option()] = 5,
    context: Annotated[str | None, typer.Option(
        help=CONTEXT_HELP + " Default: the experts' own; the output keeps it.")] = None,
    pool_dir: Annotated[Path | None, typer.Option(help="Directory with the prompt pools.")
                        ] = None,
    model: ModelOption = "default",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the Preference Control Model with REBEL on rollouts of the mixture itself."""
    from padlm.core.models import load_model
    from padlm.orchestration.experts import load_experts
    from padlm.orchestration.train_pcm import PCMTrainConfig, PCMTrainer

    data_files = tuple(data or [DEFAULT_DATA])
    for path in data_files:
        if not path.exists():
            raise PadlmError(f"data file {path} does not exist")
    config = PCMTrainConfig(
        out=out, data=data_files, steps=steps, prompts_per_step=prompts_per_step,
        max_new_tokens=max_new_tokens, eta=eta, lr=lr, updates_per_step=updates_per_step,
        width=width, eval_per_combination=eval_per_combination,
        checkpoint_every=checkpoint_every, pool_dir=pool_dir, seed=seed,
        command=invocation()).validate()
    _threads(threads)
    loaded = load_experts(experts, load_model(model))
    if context is not None:  # the config refuses a context its form cannot use
        loaded.config = replace(loaded.config, context=context)
    trainer = PCMTrainer(loaded, config)
    trained = trainer.train().pcm
    training = trained.config.training
    typer.echo(json.dumps({"out": str(out), "parameters": training["parameters"],
                           "reward_before": training["before"].get("reward"),
                           "reward_after": training["after"].get("reward"),
                           "seconds": training["seconds"]}, indent=1))

