"""``padlm data``: build and check preference data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli.options import (
    ApiKeyEnvOption,
    EngineOption,
    SamplerModelOption,
    SamplerOption,
    SamplerPlacementOption,
    invocation,
)
from padlm.data.axes import DEFAULT_AXES, check_axes
from padlm.errors import PadlmError
from padlm.server.settings import split_list

app = typer.Typer(help="Build and check preference data.", no_args_is_help=True)


def _parse_modes(spec: str) -> tuple[str, dict[str, str]] | None:
    """``sample`` | ``rewrite`` | ``AXIS=MODE,...`` (the other axes: sample), checked before
    any model loads; None for ``auto``, which needs the sampler's name."""
    from padlm.data.build import MODES, check_modes

    if spec == "auto":
        return None
    if spec in MODES:
        return spec, {}
    pairs = [part.partition("=") for part in split_list(spec)]
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


@app.command("build")
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
    axis_names = check_axes(split_list(axes) or DEFAULT_AXES)
    parsed = _parse_modes(mode)
    pools = pool_dir or default_pool_dir()
    chosen = open_sampler(sampler, placement, dtype, sampler_model, api_key_env, engine)
    default_mode, modes = parsed or _auto_modes(out, chosen.name)
    config = BuildConfig(
        out=out, pool_dir=pools, limit=limit, seed=seed, batch_size=batch_size,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, axes=axis_names,
        mode=default_mode, modes=modes, harmless_limit=harmless_limit,
        command=invocation())
    bar = tqdm(desc="pairs", unit="pair", mininterval=30)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    stats = build_dataset(chosen, config, progress)
    bar.close()
    typer.echo(json.dumps(stats))


@app.command("label-check")
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

    names = split_list(axes) or CHECK_AXES
    unknown = [name for name in names if name not in MEASURES]
    if unknown:
        raise PadlmError(f"no rule measure for axis {', '.join(unknown)}; measured axes: "
                         f"{', '.join(MEASURES)}")
    if prompts < 1:
        raise PadlmError("--prompts must be >= 1")
    pools = pool_dir or default_pool_dir()
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    result: dict = {"command": invocation(),
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


@app.command("check")
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
