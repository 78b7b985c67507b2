"""The PCM's training settings, torch-free so ``padlm train pcm`` can generate its options from
these fields (:mod:`padlm.cli.fields`): the command tree is built on every start, ``padlm
--help`` included. Each field's help is the option's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from padlm.errors import PadlmError


@dataclass
class PCMTrainConfig:
    """One REBEL run of the Preference Control Model (:class:`padlm.orchestration.train_pcm.
    PCMTrainer`)."""

    out: Path = field(metadata={"help": "Output: the experts plus the PCM in pcm/."})
    data: tuple[Path, ...] = field(metadata={
        "help": "Preference JSONL for the reward models; repeat to fit them on several "
                "files."})
    steps: int = field(default=100, metadata={"help": "REBEL steps."})
    prompts_per_step: int = field(default=4, metadata={
        "help": "Prompts per step (2 samples each)."})
    max_new_tokens: int = field(default=48, metadata={"help": "New tokens per sample, at most."})
    eta: float = field(default=1.0, metadata={"help": "REBEL's step size."})
    lr: float = field(default=3e-3, metadata={"help": "The PCM's learning rate."})
    updates_per_step: int = field(default=4, metadata={
        "help": "PCM updates per step on the step's samples."})
    width: int = field(default=64, metadata={"help": "PCM hidden width."})
    eval_per_combination: int = field(default=2, metadata={
        "help": "Held-out prompts per combination for the reward before/after."})
    checkpoint_every: int = field(default=5, metadata={"help": "Steps between checkpoints."})
    pool_dir: Path | None = field(default=None, metadata={
        "help": "Directory with the prompt pools."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the PCM, the prompt order and the sampling."})
    command: str = field(default="", metadata={
        "help": "The command that asked for the run, recorded with the PCM."})

    def validate(self) -> PCMTrainConfig:
        if min(self.steps, self.prompts_per_step, self.max_new_tokens, self.updates_per_step,
               self.width, self.checkpoint_every) < 1 or self.eval_per_combination < 0:
            raise PadlmError("steps, prompts per step, max new tokens, updates, width and "
                             "checkpoint interval must be >= 1")
        if not (self.eta > 0 and self.lr > 0):
            raise PadlmError("eta and lr must be > 0")
        return self

    def signature(self) -> dict:
        """What a checkpoint must match to be resumed (everything but the step count)."""
        data = asdict(self)
        for key in ("steps", "out", "command", "checkpoint_every"):
            data.pop(key)
        return json.loads(json.dumps(data, default=str))
