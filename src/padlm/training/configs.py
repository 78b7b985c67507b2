"""The PersRM training settings, torch-free so ``padlm train persrm`` and ``padlm train
experts`` can generate their options from these fields (:mod:`padlm.cli.fields`): the command
tree is built on every start, ``padlm --help`` included. Each field's help is the option's.

Two checks use the kernel's own lists, imported when a config is made rather than here:
``padlm.core.prompting`` imports transformers and ``padlm.core.persrm`` torch, which ``--help``
must not load; a config is only made by a run, which loads both anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from padlm.core.prompting import DEFAULT_PLACEMENT, check_placement
from padlm.data.splits import VALIDATION_FRACTION
from padlm.errors import PadlmError

HEAD_FORMS = ("full", "lowrank", "diagonal")
STAGES = ("head", "lora", "both")
LABEL_FILTERS = ("consistency", "none")


@dataclass
class HeadTrainingConfig:
    """The value head's DPO recipe (:mod:`padlm.training.head`)."""

    form: str = field(default="lowrank", metadata={"help": "full | lowrank | diagonal"})
    rank: int = field(default=16, metadata={"help": "Rank of the lowrank head's change."})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta."})
    lr: float = field(default=1e-3, metadata={"help": "Learning rate."})
    epochs: int = field(default=5, metadata={"help": "Passes over the training pairs."})
    batch_pairs: int = field(default=32, metadata={"help": "Pairs per batch."})
    identity_l2: float = field(default=0.0, metadata={"help": "L2 pull of W, b toward I, 0."})
    nll_weight: float = field(default=0.0, metadata={"help": "Weight of an NLL term (chosen)."})
    vocab: str = field(default="topk", metadata={
        "help": "topk | full (log-prob normalisation)"})
    reference: str = field(default="conditioned", metadata={
        "help": "conditioned (the reward's reference base model sees the preference, as in "
                "PAD's code; one stream at decoding) | unconditioned (it does not: an "
                "untrained head is Linear Alignment; a second stream at decoding)"})
    dimension_balance: float = field(default=0.0, metadata={
        "help": "Per-pair loss weight n_dim^-b, 0..1: 0 every pair alike, 1 every dimension "
                "alike (human pairs then stop outweighing each teacher axis)."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation and "
                                                   "the batch order."})

    def __post_init__(self) -> None:
        """Checked when made, so a bad setting fails before any cache is built."""
        from padlm.core.persrm import REFERENCES

        if self.form not in HEAD_FORMS:
            raise PadlmError(f"unknown head form {self.form!r}; choose {', '.join(HEAD_FORMS)}")
        if self.vocab not in ("topk", "full"):
            raise PadlmError("vocab must be 'topk' or 'full'")
        if self.reference not in REFERENCES:
            raise PadlmError(f"reference must be one of {', '.join(REFERENCES)}")
        if not (self.beta > 0 and self.lr > 0 and self.epochs >= 1 and self.batch_pairs >= 1):
            raise PadlmError("beta and lr must be > 0, epochs and batch size >= 1")
        if not 0 <= self.dimension_balance <= 1:
            raise PadlmError("dimension balance must be between 0 and 1, not "
                             f"{self.dimension_balance}")


@dataclass
class TrainConfig:
    """One PersRM training run (:func:`padlm.training.pipeline.run_training`)."""

    data: Path = field(metadata={"help": "Preference JSONL (padlm data build)."})
    out: Path = field(metadata={"help": "Output PersRM directory."})
    stage: str = field(default="head", metadata={"help": "head | lora | both"})
    head: HeadTrainingConfig = field(default_factory=HeadTrainingConfig, metadata={
        "help": "The value head's recipe."})
    holdout_dimensions: tuple[str, ...] = field(default=(), metadata={
        "help": "Comma list of dimensions left out of training (e.g. P3A,P3B)."})
    dimensions: tuple[str, ...] = field(default=(), metadata={
        "help": "Only these dimensions (a comma list; default: every dimension in the data)."})
    label_filter: str = field(default="consistency", metadata={"help": "consistency | none"})
    max_train_pairs: int | None = field(default=None, metadata={
        "help": "Train on at most this many pairs."})
    placement: str = field(default=DEFAULT_PLACEMENT, metadata={
        "help": "Where the preference goes: system | user-prefix | bracket."})
    top_k: int = field(default=10, metadata={
        "help": "Candidates per position: those the head trains on (vocab topk), and the "
                "top-k saved in the PersRM's config."})
    recommended_weight: float = field(default=1.0, metadata={
        "help": "recommended_weight saved in the config."})
    cache_dir: Path | None = field(default=None, metadata={"help": "Hidden-state cache root."})
    strict: bool = field(default=False, metadata={"help": "Any bad data row is fatal."})
    validation_fraction: float = field(default=VALIDATION_FRACTION, metadata={
        "help": "Share of the prompts held out for validation."})
    fold: tuple[int, int] | None = field(default=None, metadata={
        "help": "(i, k): prompt-level k-fold, fold i held out, instead of the fixed split."})
    lora_steps: int = field(default=100, metadata={"help": "Steps of the LoRA stage."})
    lora_rank: int = field(default=16, metadata={"help": "Rank of the LoRA stage's adapter."})
    command: str = field(default="", metadata={
        "help": "The command that asked for the run, recorded with the PersRM."})

    def __post_init__(self) -> None:
        """Checked when made: a bad setting must not surface after a ~37-minute cache."""
        if self.stage not in STAGES:
            raise PadlmError(f"unknown stage {self.stage!r}; choose {', '.join(STAGES)}")
        if self.label_filter not in LABEL_FILTERS:
            raise PadlmError(f"label filter must be one of {', '.join(LABEL_FILTERS)}, "
                             f"not {self.label_filter!r}")
        check_placement(self.placement)
        if self.top_k < 1 or (self.max_train_pairs is not None and self.max_train_pairs < 1):
            raise PadlmError("top-k and max train pairs must be >= 1")
        if not 0 < self.validation_fraction < 1:
            raise PadlmError("validation fraction must be in (0, 1)")
