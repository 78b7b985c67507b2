"""``padlm`` command line: a thin layer over the library.

Every user mistake becomes a one-line ``error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from padlm.cli_options import (
    DeviceOption,
    DtypeOption,
    EngineOption,
    ExpertsOption,
    ModelOption,
    PersRMOption,
    PlacementOption,
    ReferenceOption,
    ScorerOption,
)
from padlm.errors import PadlmError
from padlm.records import load_prompts

app = typer.Typer(
    help="Personalize a frozen LLM at decoding time (PAD, Linear Alignment, ARGS, ...).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The instruction to answer.")] = None,
    preference: Annotated[str | None, typer.Option(
        help="Preference text, or preset ids such as P1A+P2A.")] = None,
    strategy: Annotated[str, typer.Option(
        help="A registered strategy (`padlm strategies` lists them).")] = "pad",
    weight: Annotated[float | None, typer.Option(
        help="Guidance weight (PAD w, Linear Alignment alpha, ARGS w); default: the "
             "PersRM's saved weight for pad (and args with --scorer persrm), 10 for args "
             "with the dimension rewards, 1.0 for linear-alignment.")] = None,
    top_k: Annotated[int | None, typer.Option(
        help="Candidates per step; default: the PersRM's saved top-k for pad, else 10.")
                     ] = None,
    n: Annotated[int, typer.Option(help="Samples for best-of-n.")] = 4,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    no_repeat_ngram_size: Annotated[int, typer.Option()] = 0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    echo_guard: Annotated[bool, typer.Option(
        help="pad / linear-alignment: no guidance bonus for the preference's own words.")
                          ] = False,
    mix: Annotated[str | None, typer.Option(
        help="mix / soups: expert weights pcm | uniform | logit | fixed:w1,w2,... "
             "(default: pcm when the experts have a trained PCM, else uniform).")] = None,
    experts: ExpertsOption = "default",
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    reference: ReferenceOption = None,
    scorer: ScorerOption = None,
    placement: PlacementOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = "auto",
    engine_name: EngineOption = "hf",
    prompts_file: Annotated[Path | None, typer.Option(help="JSON, JSONL or text file.")
                            ] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are chosen.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")
                       ] = False,
) -> None:
    """Generate a personalized response (or one per line of --prompts-file)."""
    from padlm.config import GenerationConfig
    from padlm.preferences import resolve_preference
    from padlm.registry import check_request, check_scorer, strategy_class

    spec = strategy_class(strategy).spec
    if (prompt is None) == (prompts_file is None):
        fail("give exactly one of PROMPT or --prompts-file")
    if prompt is not None and not prompt.strip():
        fail("the prompt is empty")
    if batch_size < 1:
        fail("--batch-size must be >= 1")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        stop=tuple(stop or ()), no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty, weight=weight, top_k=top_k,
        echo_guard=echo_guard, mix=mix, reference=reference,
    )
    check_request(strategy, config)
    resolve_preference(preference)  # a typo like P9Z fails here, before any model loads
    if scorer is not None:
        check_scorer(scorer)
    items = load_prompts(prompts_file) if prompts_file else [{"id": "0", "prompt": prompt}]
    from padlm.engines import open_engine

    # torch, transformers (and vLLM): only once the input is valid
    engine = open_engine(engine_name, model, persrm=persrm, dtype=dtype, placement=placement,
                         device=device, experts=experts, scorer=scorer, reference=reference)
    engine.check(strategy, config)  # on vLLM: refused before its minute of start-up
    extra = {"batch_size": batch_size, "n": n} if engine_name == "hf" else {}
    meta = {"strategy": strategy, "preference": preference, "model": engine.model_name}
    if spec.uses_persrm or scorer == "persrm":
        meta["persrm"] = engine.persrm_name
    if spec.uses_scorer:  # what scored the candidates (or picked the sample)
        meta["scorer"] = engine.scorer.name
    if stream and spec.level == "token" and prompts_file is None:
        began, count = time.perf_counter(), 0
        for event in engine.stream(prompt, preference, strategy, config):
            count += 1
            sys.stdout.write(event.delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        err.print(f"[dim]{count} tokens, {count / (time.perf_counter() - began):.1f} tok/s")
        return
    results = engine.generate([i["prompt"] for i in items], preference, strategy, config,
                              **extra)
    for item, result in zip(items, results, strict=True):
        if as_json or prompts_file:
            record = {"text": result.text, **meta, "new_tokens": result.new_tokens,
                      "finish_reason": result.finish_reason,
                      "seconds": round(result.seconds, 4),
                      "tokens_per_second": round(result.new_tokens / max(result.seconds, 1e-9),
                                                 2)}
            if prompts_file:
                record = {"id": item["id"], **record}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(result.text)


@app.command()
def models() -> None:
    """List cached models, fetching and converting the default one if needed."""
    from padlm.models import cached_models, ensure_default_model

    path = ensure_default_model()
    err.print(f"default model ready at {path}")
    for entry in cached_models():
        print(json.dumps(entry))


@app.command()
def strategies() -> None:
    """List every decoding strategy and what it needs."""
    from dataclasses import asdict

    from padlm.registry import load_registry

    for cls in load_registry().values():
        print(json.dumps(asdict(cls.spec)))


def _register_subcommands() -> None:
    """Commands that live next to the feature they drive."""
    from padlm.bench_cli import register as register_bench

    register_bench(app)
    from padlm.training.cli import register as register_training

    register_training(app)
    from padlm.orchestration.cli import register as register_orchestration

    register_orchestration(app)
    from padlm.server.cli import register as register_server

    register_server(app)
    from padlm.evaluation.cli import register as register_eval

    register_eval(app)


def main() -> None:
    # every command's logs on stderr: stdout is the command's output (`--json` lines, a
    # generation) and must stay parseable; vLLM's own logger is pointed there as it is
    # imported (padlm.vllm.engine.require_vllm)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _register_subcommands()
    try:
        app()
    except PadlmError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
