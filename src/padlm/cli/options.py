"""Options that several commands share, declared once so their help and defaults agree."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, fields
from typing import Annotated

import typer

from padlm.cli.fields import FieldOptions


@dataclass(frozen=True)
class EngineSettings:
    """What opens an engine: :func:`padlm.engines.open_engine`'s arguments, with their help,
    written once for every command that opens one (``generate``, ``serve``, ``eval``), whose
    options are generated from these fields; a test holds the defaults to open_engine's."""

    model: str = field(default="default", metadata={
        "help": "'default', a HF model id or a directory."})
    persrm: str = field(default="default", metadata={"help": (
        "PAD's guide: a PersRM directory, 'default', 'conditioned' (the shipped one-lane "
        "PersRM; what 'default' means on --engine vllm), 'identity', or another model "
        "steering this one as a separate guide (a model name or directory, PAD's released "
        "PersRM, a PEFT adapter; a guide with another byte-level BPE tokenizer reads the "
        "base's text).")})
    reference: str | None = field(default=None, metadata={"help": (
        "pad's reward reference: base | base-unconditioned | guide | guide-unconditioned | "
        "none (the guide's log-probs alone); default: the guide's own.")})
    guide_alignment: str = field(default="auto", metadata={"help": (
        "How a separate guide reads the base's tokens: auto (their ids where it shares the "
        "base's vocabulary, else their text) | ids | text (each candidate scored by its "
        "whole text) | first-token (PAD's released mapping, for comparison).")})
    experts: str = field(default="default", metadata={"help": (
        "mix / soups: experts directory, or 'default' (the shipped experts and PCM, else "
        "prompted experts).")})
    scorer: str | None = field(default=None, metadata={"help": (
        "What scores args and best-of-n: dimensions (the default: the per-dimension reward "
        "models, independent of the PersRM; preset preferences only) or persrm (the PersRM's "
        "implicit reward, the one PAD follows).")})
    placement: str | None = field(default=None, metadata={"help": (
        "Where the preference goes: system | user-prefix | bracket; default: the PersRM's "
        "saved placement (user-prefix for the identity PersRM).")})
    dtype: str | None = field(default=None, metadata={"help": (
        "float32 | bfloat16 | float16; default: bfloat16 on CUDA, float32 on the CPU.")})
    device: str = field(default="auto", metadata={
        "help": "auto | cpu | cuda | cuda:N; auto = CUDA when present."})
    engine_name: str = field(default="hf", metadata={"help": (
        "hf: padlm's decode loop (every strategy); vllm: a vLLM engine (base, prompt, pad "
        "with a conditioned PersRM; make setup-vllm, then .venv-vllm/bin/padlm).")})


ENGINE = FieldOptions(EngineSettings, tuple(f.name for f in fields(EngineSettings)),
                      names={"engine_name": "engine"})


def _help(name: str) -> str:
    return next(f for f in fields(EngineSettings) if f.name == name).metadata["help"]


# single engine settings, for commands that take a few of them
ModelOption = Annotated[str, typer.Option(help=_help("model"))]
DEFAULT_PROFILE_AXES = "P1,P2,P3"
ProfileAxesOption = Annotated[str, typer.Option(
    help="The axes users' profiles learn: a comma list of the P-Soups axes P1,P2,P3 and the "
         "teacher data's free-text axes register, format, example, outlook, confidence, "
         "energy, analogy, voice.")]
PersRMOption = Annotated[str, typer.Option(help=_help("persrm"))]
ReferenceOption = Annotated[str | None, typer.Option(help=_help("reference"))]
GuideAlignmentOption = Annotated[str, typer.Option(help=_help("guide_alignment"))]
ExpertsOption = Annotated[str, typer.Option(help=_help("experts"))]
PlacementOption = Annotated[str | None, typer.Option(help=_help("placement"))]
DtypeOption = Annotated[str | None, typer.Option(help=_help("dtype"))]
DeviceOption = Annotated[str, typer.Option(help=_help("device"))]
EngineOption = Annotated[str, typer.Option("--engine", help=_help("engine_name"))]

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
