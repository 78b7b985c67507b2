"""Which PersRM steers a base model: the one resolver behind ``--persrm`` for every engine.

A PersRM is a value head on a backbone. When that backbone is the base model itself, PAD is
one stream (the fast path); when it is another model (a PersRM trained on a smaller model,
PAD's released checkpoint, a GenARM reward model, a DPO adapter, any causal LM), the guide
runs as a separate model with its own KV stream beside the base. Nothing degrades silently: a
guide for another model runs as a separate guide and says so in one log line, or is refused
with an error that names both models.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from padlm.core.models import LoadedModel, eos_ids, load_model, resolve_model_path
from padlm.core.persrm import (
    CONFIG_NAME,
    HEAD_NAME,
    PersonalizedRewardModel,
    PersRMConfig,
    ValueHead,
)
from padlm.core.prompting import DEFAULT_PLACEMENT
from padlm.core.transduction import Transducer
from padlm.errors import PadlmError

log = logging.getLogger(__name__)
# how a separate guide reads the base's tokens (auto: ids where it shares the vocabulary)
GUIDE_ALIGNMENTS = ("auto", "ids", "text", "first-token")

# PersRMs shipped for the default model, as ``--persrm`` names them: ``default`` (the most
# accurate, with a preference-free reference lane) and ``conditioned`` (one lane, so it also
# runs on vLLM)
SHIPPED_PERSRMS = ("default", "conditioned")

PersRMKind = Literal["identity", "padlm", "foreign", "guide", "missing"]


@dataclass(frozen=True)
class PersRMSource:
    """What a ``--persrm`` spec names, read from configs alone (no weights), so that every
    engine runs the same rules and only decides what it can run: ``identity`` (no PersRM),
    ``padlm`` (padlm's own directory, with its config), ``foreign`` (another project's
    checkpoint directory, inspected when loaded), ``guide`` (a model name, run as a whole
    causal LM beside the base) or ``missing`` (a path to nothing, refused when needed)."""

    spec: str | None  # as the user wrote it: refusals name it so
    kind: PersRMKind
    directory: Path | None = None
    config: PersRMConfig | None = None  # padlm directories only
    base_model: str | None = None  # what it was trained on (a guide: the model itself)
    shares_backbone: bool = False  # a padlm head on this very model: one-stream PAD

    def require(self) -> PersRMSource:
        """This source, or the refusal of a path that names nothing. Not raised by
        :func:`resolve_persrm`, so that the placement can be read and the refusal kept for
        ``pad`` alone until the PersRM is needed."""
        if self.kind == "missing":
            raise PadlmError(f"PersRM directory {self.spec} does not exist", param="persrm")
        return self


def default_persrm_dir(name: str = "default") -> Path | None:
    """The PersRM shipped inside the package under ``name``, if this build has one."""
    path = Path(str(resources.files("padlm") / "assets" / f"persrm-{name}"))
    return path if (path / CONFIG_NAME).exists() else None


def resolve_persrm(spec: str | None, model_name: str, prefer: tuple[str, ...] = ("default",)
                   ) -> PersRMSource:
    """What ``spec`` names for the base model ``model_name``: ``None``/``identity``, a shipped
    name, a directory (padlm's or another layout), a path to nothing, else a model used as a
    guide. ``default`` means the first shipped PersRM in ``prefer`` that was trained on
    ``model_name``, else the first shipped at all (an engine that runs only some of them
    prefers those). A shipped name this build lacks is refused here, before anything loads."""
    if spec is None or spec == "identity":
        return PersRMSource(spec, "identity")
    if spec in SHIPPED_PERSRMS:
        names = prefer if spec == "default" else (spec,)
        shipped = [_directory_source(spec, directory, model_name)
                   for directory in map(default_persrm_dir, names) if directory is not None]
        if not shipped:
            raise PadlmError(f"this build ships no PersRM {spec!r}: pass --persrm DIR",
                             param="persrm")
        return next((source for source in shipped if source.shares_backbone), shipped[0])
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_source(spec, path, model_name)
    if spec.startswith((".", "/", "~")):
        return PersRMSource(spec, "missing")
    return PersRMSource(spec, "guide", base_model=spec)


def _directory_source(spec: str, directory: Path, model_name: str) -> PersRMSource:
    """padlm's own layout (``config.json`` + ``head.safetensors``), else another project's."""
    if not ((directory / CONFIG_NAME).exists() and (directory / HEAD_NAME).exists()):
        return PersRMSource(spec, "foreign", directory)
    config = PersonalizedRewardModel.read_config(directory)
    return PersRMSource(spec, "padlm", directory, config, config.base_model,
                        config.base_model == model_name)


def persrm_placement(spec: str | PersonalizedRewardModel | None, model_name: str) -> str:
    """Where the preference goes by default: the placement a PersRM made for this model was
    trained with, else the default (read from its config alone, before any weights load)."""
    if isinstance(spec, PersonalizedRewardModel):
        return spec.config.placement
    source = resolve_persrm(spec, model_name)
    return source.config.placement if source.shares_backbone else DEFAULT_PLACEMENT


def load_persrm(spec: str | PersonalizedRewardModel | None, lm: LoadedModel,
                reference: str | None = None, alignment: str = "auto"
                ) -> PersonalizedRewardModel:
    """Load what ``--persrm`` names for the base model ``lm`` (see :func:`resolve_persrm`).
    ``reference`` overrides the guide's saved reward reference; ``alignment`` how a
    separate guide reads the base's tokens (:func:`align_guide`)."""
    if isinstance(spec, PersonalizedRewardModel):
        persrm = spec
    else:
        persrm = _load_source(resolve_persrm(spec, lm.name).require(), lm)
    persrm = align_guide(persrm, alignment, lm)
    if reference is not None:
        persrm.reference = reference  # the setter refuses what this PersRM cannot run
    return persrm


def _load_source(source: PersRMSource, lm: LoadedModel) -> PersonalizedRewardModel:
    """The weights ``source`` names (a ``missing`` one was refused by ``require``); a model
    named as a guide gets the identity head: its own logits are the reward."""
    if source.kind == "identity":
        return PersonalizedRewardModel.identity(lm.name, lm.model.config.hidden_size)
    if source.kind == "padlm":
        return _load_padlm_persrm(source, lm)
    if source.kind == "foreign":
        return _load_checkpoint(source.directory, lm)
    guide = _guide_model(source.spec, lm)
    separate = _separate(PersRMConfig(base_model=guide.name,
                                      hidden_size=guide.model.config.hidden_size,
                                      training={"stage": "none"}),
                         ValueHead(guide.model.config.hidden_size), guide, lm, None,
                         "guide-unconditioned", source.spec)
    log.info("guide %s (a whole causal LM, no head) steers %s as a separate model",
             guide.name, lm.name)
    return separate


def _load_padlm_persrm(source: PersRMSource, lm: LoadedModel) -> PersonalizedRewardModel:
    directory, config = source.directory, source.config
    if source.shares_backbone:
        # a LoRA PersRM wraps its own copy so the base model stays adapter-free
        loaded = PersonalizedRewardModel.load(
            directory, copy.deepcopy(lm.model) if config.lora else None)
        _check_hidden(directory, config.hidden_size, lm)
        return loaded
    guide = _guide_model(config.base_model, lm, f"PersRM {source.spec} (trained on "
                                                  f"{config.base_model})")
    _check_hidden(directory, config.hidden_size, guide)
    loaded = PersonalizedRewardModel.load(
        directory, copy.deepcopy(guide.model) if config.lora else None)
    if loaded.backbone is not None:  # the LoRA-adapted guide is the guide's backbone
        guide = LoadedModel(loaded.backbone, guide.tokenizer, guide.name)
    separate = _separate(config, loaded.head, guide, lm, str(directory), None, source.spec)
    log.info("PersRM %s was trained on %s, not %s: it runs as a separate guide model",
             source.spec, config.base_model, lm.name)
    return separate


def _load_checkpoint(directory: Path, lm: LoadedModel) -> PersonalizedRewardModel:
    """Another project's layout (PAD's released PersRM, a PEFT adapter, a causal LM)."""
    from padlm.core.checkpoints import inspect_guide, load_guide_model

    checkpoint = inspect_guide(directory)
    for warning in checkpoint.warnings:
        log.warning("%s", warning)
    guide = load_guide_model(checkpoint, lm.dtype_name, lm.device)
    hidden = guide.model.config.hidden_size
    head = ValueHead(hidden)
    if checkpoint.head is not None:
        weight, bias = checkpoint.head
        head.weight.data.copy_(weight)
        head.bias.data.copy_(bias)
    config = PersRMConfig(base_model=guide.name, hidden_size=hidden,
                          training={"stage": "imported", "layout": checkpoint.layout})
    separate = _separate(config, head, guide, lm, str(directory),
                         checkpoint.default_reference)
    log.info("guide %s (%s layout) steers %s as a separate model", directory,
             checkpoint.layout, lm.name)
    return separate


def _separate(config: PersRMConfig, head: ValueHead, guide: LoadedModel, lm: LoadedModel,
              path: str | None, reference: str | None, spec: str | None = None
              ) -> PersonalizedRewardModel:
    """A guide with its own stream: it reads the base's token ids where it shares the base's
    vocabulary, else the text of the base's tokens (byte-level BPE on both sides), said in a
    log line; refused, naming both tokenizers, when it can do neither."""
    from padlm.core.checkpoints import shared_vocabulary

    name = spec or path or guide.name
    try:
        scoreable = shared_vocabulary(
            lm.tokenizer, guide.tokenizer, guide.model.get_output_embeddings().weight.shape[0],
            lm.name, guide.name)
        transducer = None
    except PadlmError as error:
        scoreable = None
        try:
            transducer = text_transducer(guide, lm, name)
        except PadlmError as text_error:
            raise PadlmError(f"--persrm {name} cannot steer {lm.name}: {error}; nor read "
                             f"its text: {text_error}", param="persrm") from None
        log.info("guide %s has its own tokenizer: it scores %s's candidates by their text",
                 name, lm.name)
    head.to(lm.device)
    return PersonalizedRewardModel(config, head, path=path, guide=guide, reference=reference,
                                   scoreable=scoreable, transducer=transducer)


def text_transducer(guide: LoadedModel, lm: LoadedModel, name: str) -> Transducer:
    """How ``guide`` reads ``lm``'s tokens as text, or why it cannot."""
    if hasattr(guide.model, "peft_config"):
        raise PadlmError(f"guide {name} carries a LoRA adapter, which a guide with its own "
                         "tokenizer does not run yet", param="persrm")
    return Transducer(lm.tokenizer, guide.tokenizer,
                      eos_ids(lm.tokenizer, lm.model.generation_config), lm.name, guide.name)


def check_alignment(alignment: str) -> None:
    if alignment not in GUIDE_ALIGNMENTS:
        raise PadlmError(f"guide alignment must be one of {', '.join(GUIDE_ALIGNMENTS)}, got "
                         f"{alignment!r}", param="guide_alignment")


def align_guide(persrm: PersonalizedRewardModel, alignment: str, lm: LoadedModel
                ) -> PersonalizedRewardModel:
    """``persrm`` reading the base's tokens as :data:`GUIDE_ALIGNMENTS` says: ``ids`` (the
    base's ids: the same tokenizer), ``text`` (their bytes, exact scoring) or
    ``first-token`` (PAD's released mapping: each candidate's first guide token only)."""
    check_alignment(alignment)
    if alignment == "auto":
        return persrm
    if not persrm.separate:
        raise PadlmError(f"guide alignment {alignment} applies to a guide model of its own; "
                         f"PersRM {persrm.name} is a head on {lm.name}'s backbone",
                         param="guide_alignment")
    if alignment == "ids":
        if persrm.transducer is not None:
            raise PadlmError(f"guide {persrm.name} does not share {lm.name}'s tokenizer, so it "
                             "cannot read the base's token ids: use text or first-token",
                             param="guide_alignment")
        return persrm
    persrm.transducer = persrm.transducer or text_transducer(persrm.guide, lm, persrm.name)
    persrm.scoreable = None
    persrm.first_token_only = alignment == "first-token"
    return persrm


def _guide_model(name: str, lm: LoadedModel, what: str | None = None) -> LoadedModel:
    """The guide's backbone, on the base model's device and in its dtype; the base model
    itself (not a second copy) when ``name`` is it."""
    try:
        path = resolve_model_path(name)
    except PadlmError as error:
        raise PadlmError(f"{what or 'guide ' + name}: cannot load its backbone for "
                         f"{lm.name}: {error}", param="persrm") from None
    if path == getattr(lm.model.config, "_name_or_path", None):
        return lm
    return load_model(name, lm.dtype_name, lm.device)


def _check_hidden(directory: Path, hidden: int, lm: LoadedModel) -> None:
    if hidden != lm.model.config.hidden_size:
        raise PadlmError(f"PersRM {directory} was made for hidden size {hidden}, the model "
                         f"{lm.name} has {lm.model.config.hidden_size}", param="persrm")
