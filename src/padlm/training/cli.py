"""``padlm data build`` and ``padlm train persrm`` (registered from ``padlm.cli``)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli_options import ModelOption, PlacementOption
from padlm.errors import PadlmError

log = logging.getLogger(__name__)
data_app = typer.Typer(help="Build and check preference data.", no_args_is_help=True)
train_app = typer.Typer(help="Train personalization models.", no_args_is_help=True)


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@data_app.command("build")
def data_build(
    out: Annotated[Path, typer.Option(help="Output JSONL (appended to; resumes).")],
    limit: Annotated[int | None, typer.Option(help="Generation prompts to use.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 16,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    axes: Annotated[str, typer.Option(help="Comma list of P1,P2,P3,helpful,humor,harmless.")
                    ] = "P1,P2,P3,helpful,humor,harmless",
    harmless_limit: Annotated[int, typer.Option(help="HH-RLHF pairs to include.")] = 400,
    pool_dir: Annotated[Path | None, typer.Option(help="Directory with the prompt pools.")
                        ] = None,
    model: ModelOption = "default",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 (faster sampling).")
                     ] = "bfloat16",
) -> None:
    """Build a multi-preference dataset offline (contrastive prompting + HH-RLHF pairs)."""
    from tqdm import tqdm

    from padlm.data.build import BuildConfig, build_dataset
    from padlm.data.pools import default_pool_dir
    from padlm.engine import Personalizer

    if batch_size < 2:
        raise PadlmError("--batch-size must be >= 2 (each pair decodes two rows)")
    if limit is not None and limit < 1:
        raise PadlmError("--limit must be >= 1")
    config = BuildConfig(out=out, pool_dir=pool_dir or default_pool_dir(), limit=limit,
                         seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         axes=_csv(axes), harmless_limit=harmless_limit)
    engine = Personalizer(model, persrm="identity", dtype=dtype)
    bar = tqdm(desc="contrastive pairs", unit="pair", mininterval=5)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    stats = build_dataset(engine, config, progress)
    bar.close()
    typer.echo(stats)


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Preference JSONL to validate.")],
    strict: Annotated[bool, typer.Option(help="Any bad row is fatal.")] = False,
) -> None:
    """Validate a dataset; bad rows are reported with their line numbers."""
    from padlm.data.schema import load_rows

    rows, errors = load_rows(path, strict=strict)
    for number, message in errors:
        typer.echo(f"{path}:{number}: {message}", err=True)
    typer.echo(f"{len(rows)} valid rows, {len(errors)} bad")


@train_app.command("persrm")
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
    strict: Annotated[bool, typer.Option(help="Any bad data row is fatal.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a PersRM (PAD's stages): a value head on cached states, optionally after LoRA."""
    import json

    from padlm.models import load_model
    from padlm.training.head import HeadTrainingConfig
    from padlm.training.pipeline import TrainConfig, run_training

    if not data.exists():
        raise PadlmError(f"data file {data} does not exist")
    head = HeadTrainingConfig(form=form, rank=rank, beta=beta, lr=lr, epochs=epochs,
                              identity_l2=identity_l2, nll_weight=nll_weight, vocab=vocab,
                              reference=reference, seed=seed).validate()
    config = TrainConfig(
        data=data, out=out, stage=stage, head=head,
        holdout_dimensions=_csv(holdout_dimensions), dimensions=_csv(dimensions),
        label_filter=label_filter, placement=placement, top_k=top_k,
        recommended_weight=weight, cache_dir=cache_dir, strict=strict, lora_steps=lora_steps,
        lora_rank=lora_rank, command="padlm " + shlex.join(sys.argv[1:]),
    )
    persrm = run_training(load_model(model), config)
    summary = persrm.config.training["validation"]
    typer.echo(json.dumps({"out": str(out), "validation": summary,
                           "head_training_seconds":
                               persrm.config.training["head_training_seconds"]}, indent=1))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")
