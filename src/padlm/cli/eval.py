"""``padlm eval`` (the harness) and its sub-commands ``train-harmlessness``, ``report`` and
``llm-judge``.

Each command imports the harness, judges and engine inside its body: they pull torch,
transformers and httpx, and ``padlm --help`` builds this module's commands without paying for
them (so :class:`padlm.evaluation.harness.EvalPlan`'s options are not generated from it).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from padlm.cli.fields import GENERATION_HELP, FieldOptions, config_options
from padlm.cli.options import DEFAULT_PROFILE_AXES, ENGINE, ProfileAxesOption, invocation
from padlm.core.config import GenerationConfig
from padlm.core.registry import check_scorer, strategy_names
from padlm.errors import PadlmError
from padlm.evaluation.report import headline_table, rewrite
from padlm.server.settings import split_list

app = typer.Typer(help="Evaluate strategies on P-Soups (default) and tools around it.",
                  invoke_without_command=True, no_args_is_help=False)

DEFAULT_PREFERENCES = "P1A,P1B,P2A,P2B,P3A,P3B"

JudgeConcurrencyOption = Annotated[int, typer.Option(
    help="LLM judge questions in flight at once (a batching server answers them together).")]
JudgeSamplesOption = Annotated[int, typer.Option(
    help="Votes per question sampled at temperature 1 (a graded verdict: a small judge's "
         "greedy answer is often the same letter whatever it reads); 1: one greedy answer.")]
JudgeLogprobsOption = Annotated[bool, typer.Option(
    help="Score each question by the judge's probabilities of A and B (graded, one token; "
         "needs an endpoint that returns logprobs, such as vLLM's own server).")]
JudgeTiesOption = Annotated[bool, typer.Option(
    "--judge-ties/--judge-no-ties",
    help="--judge-no-ties: answers are A or B only (small judges answer TIE to nearly all).")]


# an evaluation is reproducible by default (seed 0); a generation draws a fresh seed
DECODING = FieldOptions(GenerationConfig, (
    "max_new_tokens", "no_repeat_ngram_size", "repetition_penalty", "echo_guard", "top_k",
    "seed"), helps=GENERATION_HELP, defaults={"seed": 0})


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in split_list(text)]
    except ValueError:
        raise PadlmError(f"{option} must be comma-separated numbers, got {text!r}") from None


@app.callback()
@config_options(decoding=DECODING, engine_args=ENGINE)
def eval_command(
    ctx: typer.Context,
    *,
    benchmark: Annotated[str, typer.Option(help="'psoups' (50 Koala prompts) or a prompts "
                                           "file (JSON, JSONL or text).")] = "psoups",
    preferences: Annotated[str, typer.Option(
        help="Comma-separated preference ids, combinations (P1A+P2A+P3A) or free text "
             "(then name its judges with --judge).")] = DEFAULT_PREFERENCES,
    strategies: Annotated[str | None, typer.Option(
        help="Comma-separated strategies, the expert ones with their mixing weights "
             "(mix:pcm, mix:uniform, mix:logit, soups); default: every registered strategy "
             "that needs no orchestration experts (`padlm strategies` lists them).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (resumable).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N prompts.")] = None,
    weights: Annotated[str, typer.Option(help="PAD weight sweep, e.g. 0,0.5,1,1.5 "
                                         "('' for none).")] = "0,0.5,1,1.5",
    decoding: dict[str, Any],
    n: Annotated[int, typer.Option(help="Samples for best-of-n.")] = 4,
    batch_size: Annotated[int, typer.Option()] = 8,
    judge: Annotated[list[str] | None, typer.Option(
        help="Direction for free-text preferences, e.g. friendliness:+ (repeatable).")] = None,
    engine_args: dict[str, Any],
    judge_url: Annotated[str | None, typer.Option(
        help="Also run the pairwise LLM judge against this OpenAI-compatible base URL.")
                         ] = None,
    judge_model: Annotated[str | None, typer.Option()] = None,
    judge_key_env: Annotated[str, typer.Option(help="Env var holding the API key.")
                             ] = "OPENAI_API_KEY",
    judge_concurrency: JudgeConcurrencyOption = 1,
    judge_ties: JudgeTiesOption = True,
    judge_samples: JudgeSamplesOption = 1,
    judge_logprobs: JudgeLogprobsOption = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    generate: Annotated[bool, typer.Option(
        help="--no-generate: only score and summarise the cells already generated.")] = True,
) -> None:
    """Generate (resumable), score with offline judges, write summary.json, report.md, plots."""
    if ctx.invoked_subcommand is not None:
        return
    from padlm.core.devices import check_engine
    from padlm.evaluation.harness import (
        SWEPT,
        EvalPlan,
        dimensions,
        jobs,
        load_benchmark,
        run,
    )
    from padlm.evaluation.pairwise import judge_summary
    from padlm.judges import parse_direction
    from padlm.judges.llm import LLMJudge

    if out is None:
        raise PadlmError("--out DIR is required")
    if batch_size < 1 or n < 1:
        raise PadlmError("--batch-size and -n must be >= 1")
    if (judge_url is None) != (judge_model is None):
        raise PadlmError("give both --judge-url and --judge-model, or neither")
    chosen = (list(split_list(strategies)) if strategies is not None
              else list(strategy_names(uses_experts=False)))
    plan = EvalPlan(
        benchmark=benchmark, preferences=list(split_list(preferences)), strategies=chosen,
        weights=_floats(weights, "--weights") if SWEPT in chosen else [],
        limit=limit, batch_size=batch_size, n=n,
        directions=[parse_direction(spec) for spec in judge or []],
        config=GenerationConfig(**decoding),
    )
    if not plan.preferences or not plan.strategies:
        raise PadlmError("--preferences and --strategies must not be empty")
    load_benchmark(benchmark, limit)
    for spec in plan.preferences:
        dimensions(spec, plan.directions)
    jobs(plan, 1.0)  # unknown strategies fail here, before the model loads
    if engine_args["scorer"] is not None:
        check_scorer(engine_args["scorer"])
    check_engine(engine_args["engine_name"])
    from padlm.engines import open_engine

    decoder = None
    if engine_args["engine_name"] == "vllm":  # generates; the HF engine still scores
        # (perplexity, the PersRM's rewards): the hf-only settings are the scorer's alone
        decoder = open_engine(**{name: value for name, value in engine_args.items()
                                 if name not in ("device", "experts", "scorer")})
        for job in jobs(plan, 1.0):
            decoder.check(job.strategy, plan.config)  # before either engine loads
    engine = open_engine(**{**engine_args, "engine_name": "hf"})
    # the command that regenerates this report (flags that do not change results dropped)
    quiet = {"--no-generate", "--no-progress", "--progress", "--generate"}
    command = "padlm eval " + " ".join(shlex.quote(a) for a in sys.argv[2:] if a not in quiet) \
        if len(sys.argv) > 2 and sys.argv[1] == "eval" else None

    def with_llm_judge(summary: dict) -> None:
        if judge_url is None:
            return
        llm = LLMJudge.from_env(judge_url, judge_model, judge_key_env,
                                cache=out / "llm_judge_cache.jsonl",
                                concurrency=judge_concurrency, ties=judge_ties,
                                samples=judge_samples, logprobs=judge_logprobs)
        judge_summary(llm, summary, out, plan)

    summary = run(engine, plan, out, progress=progress, command=command,
                  on_summary=with_llm_judge, generate_missing=generate, decoder=decoder)
    print(headline_table(summary))
    print(f"\nwrote {out / 'summary.json'}, {out / 'report.md'} and plots")


@app.command("feedback")
@config_options(decoding=DECODING, engine_args=ENGINE)
def feedback_command(
    *,
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")],
    strategy: Annotated[str, typer.Option(
        help="What the profiles and the oracle decode with.")] = "pad",
    rounds: Annotated[int, typer.Option(help="Choices each simulated user makes.")] = 32,
    checkpoints: Annotated[str, typer.Option(
        help="After how many choices the learned profile decodes the benchmark.")
    ] = "0,2,4,8,16,32",
    limit: Annotated[int | None, typer.Option(help="Use the first N benchmark prompts.")
                     ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows decoded together.")] = 16,
    pool_dir: Annotated[Path | None, typer.Option(
        help="The training pool's directory (default: $PADLM_DATA_DIR or ./data).")] = None,
    profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES,
    decoding: dict[str, Any],
    engine_args: dict[str, Any],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Simulated users learn profiles from their choices; learning curves against the
    oracle and a random chooser (feedback-summary.json, feedback.md, feedback.png). With
    free-text --profile-axes that a rule judge reads (format, energy), users whose targets
    combine two of them join the eight P-Soups targets."""
    from padlm.core.registry import strategy_class
    from padlm.evaluation.feedback import check_checkpoints, run
    from padlm.evaluation.harness import load_benchmark
    from padlm.profiles.features import parse_axes

    strategy_class(strategy)  # an unknown strategy fails before the model loads
    axes = parse_axes(profile_axes)
    try:
        marks = sorted({int(part) for part in split_list(checkpoints)})
    except ValueError:
        raise PadlmError(f"--checkpoints must be comma-separated integers, got "
                         f"{checkpoints!r}") from None
    if rounds < 1 or batch_size < 1:
        raise PadlmError("--rounds and --batch-size must be >= 1")
    check_checkpoints(marks, rounds)
    load_benchmark("psoups", limit)
    if engine_args["engine_name"] != "hf":
        raise PadlmError("padlm eval feedback decodes with --engine hf (its rounds batch "
                         "rows of different users through the HF decode batch)")
    from padlm.engines import open_engine

    engine = open_engine(**engine_args)
    run(engine, out, strategy, rounds, marks, GenerationConfig(**decoding), batch_size,
        decoding["seed"], limit, pool_dir, progress, command=invocation(), axes=axes)
    print((out / "feedback.md").read_text("utf-8"))


@app.command("report")
def report_command(out: Annotated[Path, typer.Argument(help="A `padlm eval` output dir.")]
                   ) -> None:
    """Redraw report.md and the plots from DIR/summary.json (no model needed)."""
    if not (out / "summary.json").exists():
        raise PadlmError(f"{out / 'summary.json'} does not exist")
    rewrite(out)


@app.command("train-harmlessness")
def train_harmlessness(
    data: Annotated[Path, typer.Option(
        help="HH-RLHF harmless-base JSONL(.gz), e.g. data/hh_rlhf_harmless_base_test.jsonl.gz "
             "in a source checkout.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the head (default: the "
                                             "packaged assets/harmlessness).")] = None,
    holdout: Annotated[float, typer.Option(help="Share of pairs held out.")] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the harmlessness judge (MiniLM + Bradley-Terry head) and report held-out
    pairwise accuracy."""
    from padlm.judges.harmlessness import asset_dir, train

    if not data.exists():
        raise PadlmError(f"{data} does not exist")
    metrics = train(data, out or asset_dir(), holdout=holdout, seed=seed)
    print(json.dumps({k: metrics[k] for k in ("pairs", "train_pairs", "heldout_pairs",
                                              "weight_decay", "train_accuracy",
                                              "heldout_accuracy")}, indent=2))


@app.command("llm-judge")
def llm_judge_command(
    out: Annotated[Path, typer.Argument(help="A finished `padlm eval` output dir.")],
    judge_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL (…/v1).")],
    judge_model: Annotated[str, typer.Option()],
    judge_key_env: Annotated[str, typer.Option(help="Env var holding the API key.")
                             ] = "OPENAI_API_KEY",
    against: Annotated[str, typer.Option(
        help="The label every other row is compared with (e.g. linear-alignment).")] = "base",
    labels: Annotated[str | None, typer.Option(
        help="Only these labels, comma-separated (e.g. 'pad@weight=1').")] = None,
    both_orders: Annotated[bool, typer.Option(
        help="Ask every pair in both orders (cancels position bias; reports consistency).")
    ] = False,
    judge_concurrency: JudgeConcurrencyOption = 1,
    judge_ties: JudgeTiesOption = True,
    judge_samples: JudgeSamplesOption = 1,
    judge_logprobs: JudgeLogprobsOption = False,
) -> None:
    """Pairwise LLM judgement (P-Soups criteria) of the strategies in DIR against one of them
    (base by default); verdicts are cached in DIR/llm_judge_cache.jsonl and written to
    DIR/llm_judge.json (or DIR/llm_judge_vs_<against>.json)."""
    from padlm.evaluation.pairwise import judge_directory
    from padlm.judges.llm import LLMJudge

    llm = LLMJudge.from_env(judge_url, judge_model, judge_key_env,
                            cache=out / "llm_judge_cache.jsonl", concurrency=judge_concurrency,
                            ties=judge_ties, samples=judge_samples, logprobs=judge_logprobs)
    result = judge_directory(llm, out, against, list(split_list(labels)) if labels else None,
                             both_orders)
    print(json.dumps({"rows": result["rows"], "pooled": result["pooled"]}, indent=2))
