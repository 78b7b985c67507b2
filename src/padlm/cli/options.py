"""Options that several commands share, declared once so their help and defaults agree."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer

ModelOption = Annotated[str, typer.Option(help="'default', a HF model id or a directory.")]
PersRMOption = Annotated[str, typer.Option(
    help="PAD's guide: a PersRM directory, 'default', 'conditioned' (the shipped one-lane "
         "PersRM; what 'default' means on --engine vllm), 'identity', or another model "
         "steering this one as a separate guide (a model name or directory, PAD's released "
         "PersRM, a PEFT adapter; a guide with another byte-level BPE tokenizer reads the "
         "base's text).")]
GuideAlignmentOption = Annotated[str, typer.Option(
    help="How a separate guide reads the base's tokens: auto (their ids where it shares the "
         "base's vocabulary, else their text) | ids | text (each candidate scored by its "
         "whole text) | first-token (PAD's released mapping, for comparison).")]
ReferenceOption = Annotated[str | None, typer.Option(
    help="pad's reward reference: base | base-unconditioned | guide | guide-unconditioned | "
         "none (the guide's log-probs alone); default: the guide's own.")]
ExpertsOption = Annotated[str, typer.Option(
    help="mix / soups: experts directory, or 'default' (the shipped experts and PCM, else "
         "prompted experts).")]
PlacementOption = Annotated[str | None, typer.Option(
    help="Where the preference goes: system | user-prefix | bracket; default: the PersRM's "
         "saved placement (user-prefix for the identity PersRM).")]
DtypeOption = Annotated[str | None, typer.Option(
    help="float32 | bfloat16 | float16; default: bfloat16 on CUDA, float32 on the CPU.")]
DeviceOption = Annotated[str, typer.Option(
    help="auto | cpu | cuda | cuda:N; auto = CUDA when present.")]
EngineOption = Annotated[str, typer.Option(
    "--engine", help="hf: padlm's decode loop (every strategy); vllm: a vLLM engine (base, "
                     "prompt, pad with a conditioned PersRM; make setup-vllm, then "
                     ".venv-vllm/bin/padlm).")]
ScorerOption = Annotated[str | None, typer.Option(
    help="What scores args and best-of-n: dimensions (the default: the per-dimension reward "
         "models, independent of the PersRM; preset preferences only) or persrm (the PersRM's "
         "implicit reward, the one PAD follows).")]

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


def invocation() -> str:
    """The command as typed, recorded beside what it wrote so a result can be reproduced."""
    return "padlm " + shlex.join(sys.argv[1:])
