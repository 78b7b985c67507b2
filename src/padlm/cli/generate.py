"""``padlm generate``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from padlm.cli.fields import GENERATION_HELP, FieldOptions, config_options
from padlm.cli.options import ENGINE
from padlm.core.config import GenerationConfig
from padlm.errors import PadlmError
from padlm.records import load_prompts

DECODING = FieldOptions(GenerationConfig, (
    "weight", "top_k", "max_new_tokens", "temperature", "top_p", "seed", "stop",
    "no_repeat_ngram_size", "repetition_penalty", "echo_guard", "mix"), helps=GENERATION_HELP)


@config_options(decoding=DECODING, engine_args=ENGINE)
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The instruction to answer.")] = None,
    *,
    preference: Annotated[str | None, typer.Option(
        help="Preference text, or preset ids such as P1A+P2A.")] = None,
    strategy: Annotated[str, typer.Option(
        help="A registered strategy (`padlm strategies` lists them).")] = "pad",
    decoding: dict[str, Any],
    n: Annotated[int, typer.Option(help="Samples for best-of-n.")] = 4,
    engine_args: dict[str, Any],
    prompts_file: Annotated[Path | None, typer.Option(help="JSON, JSONL or text file.")
                            ] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are chosen.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")
                       ] = False,
) -> None:
    """Generate a personalized response (or one per line of --prompts-file)."""
    from padlm.core.preferences import parse_preference
    from padlm.core.registry import check_request, check_scorer, strategy_class

    spec = strategy_class(strategy).spec
    if (prompt is None) == (prompts_file is None):
        raise PadlmError("give exactly one of PROMPT or --prompts-file")
    if prompt is not None and not prompt.strip():
        raise PadlmError("the prompt is empty")
    if batch_size < 1:
        raise PadlmError("--batch-size must be >= 1")
    scorer = engine_args["scorer"]
    config = GenerationConfig(**decoding, reference=engine_args["reference"])
    check_request(strategy, config)
    parse_preference(preference)  # a typo like P9Z fails here, before any model loads
    if scorer is not None:
        check_scorer(scorer)
    items = load_prompts(prompts_file) if prompts_file else [{"id": "0", "prompt": prompt}]
    from padlm.engines import open_engine

    # torch, transformers (and vLLM): only once the input is valid
    engine = open_engine(**engine_args)
    engine.check(strategy, config)  # on vLLM: refused before its minute of start-up
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
        Console(stderr=True).print(
            f"[dim]{count} tokens, {count / (time.perf_counter() - began):.1f} tok/s")
        return
    results = engine.generate([i["prompt"] for i in items], preference, strategy, config,
                              batch_size=batch_size, n=n)
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
