"""``padlm data build`` and ``padlm train persrm`` (registered from ``padlm.cli``)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli_options import DtypeOption, EngineOption, ModelOption, PlacementOption
from padlm.data.axes import DEFAULT_AXES, check_axes
from padlm.errors import PadlmError

log = logging.getLogger(__name__)
data_app = typer.Typer(help="Build and check preference data.", no_args_is_help=True)
train_app = typer.Typer(help="Train personalization models.", no_args_is_help=True)


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


SamplerOption = Annotated[str, typer.Option(
    "--sampler", "--model",
    help="Who writes the responses: 'default', a named model (padlm models), a HF id, a "
         "directory, or an OpenAI-compatible endpoint URL ending in /v1.")]
SamplerModelOption = Annotated[str | None, typer.Option(
    help="Model name to request from a sampler endpoint (default: its first listed model).")]
ApiKeyEnvOption = Annotated[str, typer.Option(
    help="Environment variable holding the sampler endpoint's API key.")]
SamplerPlacementOption = Annotated[str | None, typer.Option(
    "--placement", help="Where a local sampler gets its instruction: system | user-prefix | "
                        "bracket; default: the one measured for it (system if unknown).")]


def _parse_modes(spec: str) -> tuple[str, dict[str, str]] | None:
    """``sample`` | ``rewrite`` | ``AXIS=MODE,...`` (the other axes: sample), checked before
    any model loads; None for ``auto``, which needs the sampler's name."""
    from padlm.data.build import MODES, check_modes

    if spec == "auto":
        return None
    if spec in MODES:
        return spec, {}
    pairs = [part.partition("=") for part in _csv(spec)]
    if not pairs or any(not sep for _, sep, _ in pairs):
        raise PadlmError(f"--mode {spec!r}: use sample, rewrite, auto or AXIS=MODE,...")
    modes = {axis.strip(): mode.strip() for axis, _, mode in pairs}
    check_modes("sample", modes)
    return "sample", modes


def _auto_modes(out: Path, sampler_name: str) -> tuple[str, dict[str, str]]:
    """The per-axis modes the label check of this sampler recorded in the build record."""
    from padlm.data.build import record_path

    record = record_path(out)
    check = (json.loads(record.read_text()) if record.exists() else {}).get("label_check")
    if not check or check.get("sampler") != sampler_name:
        raise PadlmError(f"--mode auto needs a label check of {sampler_name} in {record}: run "
                         "padlm data label-check first")
    return "sample", dict(check["chosen_modes"])


@data_app.command("build")
def data_build(
    out: Annotated[Path, typer.Option(help="Output JSONL (appended to; resumes).")],
    limit: Annotated[int | None, typer.Option(help="Generation prompts to use.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 16,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option()] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.9,
    axes: Annotated[str | None, typer.Option(
        help="Comma list of axes (default: all; see padlm.data.axes), 'harmless' for the "
             "HH-RLHF pairs.")] = None,
    mode: Annotated[str, typer.Option(
        help="sample | rewrite (contrastive rewriting of one neutral answer) | auto (per "
             "axis, as the label check chose) | AXIS=MODE,...")] = "sample",
    harmless_limit: Annotated[int | None, typer.Option(
        help="HH-RLHF pairs to include (default: every usable one).")] = None,
    pool_dir: Annotated[Path | None, typer.Option(help="Directory with the prompt pools.")
                        ] = None,
    sampler: SamplerOption = "default",
    sampler_model: SamplerModelOption = None,
    api_key_env: ApiKeyEnvOption = "PADLM_SAMPLER_API_KEY",
    placement: SamplerPlacementOption = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 (faster sampling).")
                     ] = "bfloat16",
    engine: EngineOption = "hf",
) -> None:
    """Build a multi-preference dataset offline (a sampler's contrastive pairs + HH-RLHF)."""
    from tqdm import tqdm

    from padlm.data.build import BuildConfig, build_dataset
    from padlm.data.pools import default_pool_dir
    from padlm.data.samplers import open_sampler

    if batch_size < 2:
        raise PadlmError("--batch-size must be >= 2 (each pair decodes two rows)")
    if limit is not None and limit < 1:
        raise PadlmError("--limit must be >= 1")
    axis_names = check_axes(_csv(axes) or DEFAULT_AXES)
    parsed = _parse_modes(mode)
    pools = pool_dir or default_pool_dir()
    chosen = open_sampler(sampler, placement, dtype, sampler_model, api_key_env, engine)
    default_mode, modes = parsed or _auto_modes(out, chosen.name)
    config = BuildConfig(
        out=out, pool_dir=pools, limit=limit, seed=seed, batch_size=batch_size,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, axes=axis_names,
        mode=default_mode, modes=modes, harmless_limit=harmless_limit,
        command="padlm " + shlex.join(sys.argv[1:]))
    bar = tqdm(desc="pairs", unit="pair", mininterval=30)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    stats = build_dataset(chosen, config, progress)
    bar.close()
    typer.echo(json.dumps(stats))


@data_app.command("label-check")
def data_label_check(
    record: Annotated[Path, typer.Option(
        help="Build output JSONL whose build record (<stem>.build.json) gets the result.")],
    sampler: SamplerOption = "qwen2.5-coder-1.5b-instruct",
    baseline: Annotated[str, typer.Option(help="Self-sampling baseline (sample mode only).")
                        ] = "default",
    prompts: Annotated[int, typer.Option(help="Build prompts to check.")] = 16,
    axes: Annotated[str | None, typer.Option(
        help="Comma list of measured axes (default: P1,P2,P3; also format, energy, "
             "confidence, voice).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 16,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option()] = 0.7,
    pool_dir: Annotated[Path | None, typer.Option(help="Directory with the prompt pools.")
                        ] = None,
    sampler_model: SamplerModelOption = None,
    api_key_env: ApiKeyEnvOption = "PADLM_SAMPLER_API_KEY",
    placement: SamplerPlacementOption = None,
    dtype: Annotated[str, typer.Option()] = "bfloat16",
) -> None:
    """Directional agreement and refusal rate per axis: the sampler in both modes vs the
    baseline's self-sampling; records the per-axis mode choice for ``data build --mode auto``."""
    import time
    from datetime import UTC, datetime

    from padlm.data.build import update_record
    from padlm.data.labels import CHECK_AXES, MEASURES, check_sampler, choose_modes
    from padlm.data.pools import default_pool_dir
    from padlm.data.samplers import SamplingSettings, open_sampler

    names = _csv(axes) or CHECK_AXES
    unknown = [name for name in names if name not in MEASURES]
    if unknown:
        raise PadlmError(f"no rule measure for axis {', '.join(unknown)}; measured axes: "
                         f"{', '.join(MEASURES)}")
    if prompts < 1:
        raise PadlmError("--prompts must be >= 1")
    pools = pool_dir or default_pool_dir()
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    result: dict = {"command": "padlm " + shlex.join(sys.argv[1:]),
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "prompts": prompts, "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "measures": {
                        name: f"{MEASURES[name][0].__name__} "
                              f"({'higher' if MEASURES[name][1] > 0 else 'lower'} for the A side)"
                        for name in names}}
    for role, spec, modes in (("baseline", baseline, ("sample",)),
                              ("teacher", sampler, ("sample", "rewrite"))):
        began = time.perf_counter()
        chosen = open_sampler(spec, placement if role == "teacher" else None, dtype,
                               sampler_model, api_key_env)
        checked = check_sampler(chosen, modes, pools, prompts, names, seed, settings,
                                temperature, batch_size)
        seconds = time.perf_counter() - began
        result[role] = {"sampler": chosen.name, "placement": chosen.placement,
                        "seconds": round(seconds, 1),
                        "tokens_per_second": round(checked["tokens"] / seconds, 1),
                        **checked}
        del chosen
    result["sampler"] = result["teacher"]["sampler"]
    result["chosen_modes"] = choose_modes(result["teacher"]["modes"])
    path = update_record(record, "label_check", result)
    typer.echo(json.dumps({role: {m: {a: s.get("agreement") for a, s in axes_.items()}
                                  for m, axes_ in result[role]["modes"].items()}
                           for role in ("baseline", "teacher")}, indent=1))
    typer.echo(f"chosen modes: {result['chosen_modes']} (recorded in {path})")


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Preference JSONL to validate.")],
    strict: Annotated[bool, typer.Option(help="Any bad row is fatal.")] = False,
) -> None:
    """Validate a dataset; bad rows are reported with their line numbers. For a build's
    output (it has a ``.done`` sidecar) also the pairs kept, dropped and refused per side."""
    from collections import Counter

    from padlm.data.build import progress_summary, sidecar
    from padlm.data.schema import load_rows

    rows, errors = load_rows(path, strict=strict)
    for number, message in errors:
        typer.echo(f"{path}:{number}: {message}", err=True)
    typer.echo(f"{len(rows)} valid rows, {len(errors)} bad")
    if sidecar(path, ".done").exists():
        typer.echo(json.dumps({"rows": dict(Counter(r.dimension for r in rows)),
                               **progress_summary(path)}))


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
    import json

    from padlm.models import load_model
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
        holdout_dimensions=_csv(holdout_dimensions), dimensions=_csv(dimensions),
        label_filter=label_filter, placement=placement, top_k=top_k,
        recommended_weight=weight, cache_dir=cache_dir, strict=strict, lora_steps=lora_steps,
        lora_rank=lora_rank, command="padlm " + shlex.join(sys.argv[1:]),
    )
    persrm = run_training(load_model(model, dtype=dtype), config)
    summary = persrm.config.training["validation"]
    typer.echo(json.dumps({"out": str(out), "validation": summary,
                           "head_training_seconds":
                               persrm.config.training["head_training_seconds"]}, indent=1))


def bench_sampler(
    sampler: SamplerOption = "qwen2.5-coder-1.5b-instruct",
    engine: Annotated[str, typer.Option(
        help="Engines to time in turn, e.g. hf,vllm; ratios are to the first.")] = "hf,vllm",
    requests: Annotated[int, typer.Option(help="Build requests decoded together.")] = 32,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option()] = 0.7,
    seed: Annotated[int, typer.Option()] = 0,
    record: Annotated[Path | None, typer.Option(
        help="A build's output JSONL: its build record (<stem>.build.json) keeps the result "
             "as engine_comparison.")] = None,
    pool_dir: Annotated[Path | None, typer.Option(help="Directory with the prompt pools.")
                        ] = None,
    placement: SamplerPlacementOption = None,
    dtype: Annotated[str, typer.Option()] = "bfloat16",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A local sampler's tokens/s on each engine, the same build requests, in one run."""
    from padlm.data.build import update_record
    from padlm.data.pools import default_pool_dir
    from padlm.data.sampler_bench import (
        bench_requests,
        comparison_record,
        comparison_table,
        time_sampler,
        with_ratios,
    )
    from padlm.data.samplers import SamplingSettings, is_endpoint, open_sampler
    from padlm.devices import check_engine

    engines = [check_engine(name) for name in _csv(engine)]
    if not engines:
        raise PadlmError("--engine names one engine or more, e.g. hf,vllm")
    if is_endpoint(sampler):
        raise PadlmError("bench sampler times local engines; an endpoint's speed is its "
                         "server's (padlm bench serve --url)")
    if requests < 1 or max_new_tokens < 1:
        raise PadlmError("--requests and --max-new-tokens must be >= 1")
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    batch = bench_requests(pool_dir or default_pool_dir(), requests, seed, temperature)
    results = []
    for name in engines:
        log.info("timing %s on the %s engine (%d requests)", sampler, name, len(batch))
        results.append(time_sampler(
            lambda name=name: open_sampler(sampler, placement, dtype, engine=name), batch,
            settings))
    results = with_ratios(results)
    if record is not None:
        path = update_record(record, "engine_comparison", comparison_record(
            results, "padlm " + shlex.join(sys.argv[1:]), settings, temperature))
        log.info("recorded in %s", path)
    typer.echo(json.dumps(results, indent=2) if as_json else comparison_table(results))


def register(app: typer.Typer) -> None:
    from padlm.bench_cli import bench_app

    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")
    bench_app.command("sampler")(bench_sampler)
