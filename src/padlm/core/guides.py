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
import json
import logging
from importlib import resources
from pathlib import Path

from padlm.core.models import LoadedModel, load_model, resolve_model_path
from padlm.core.persrm import (
    CONFIG_NAME,
    HEAD_NAME,
    PersonalizedRewardModel,
    PersRMConfig,
    ValueHead,
)
from padlm.core.prompting import DEFAULT_PLACEMENT
from padlm.errors import PadlmError

log = logging.getLogger(__name__)

# PersRMs shipped for the default model, as ``--persrm`` names them: ``default`` (the most
# accurate, with a preference-free reference lane) and ``conditioned`` (one lane, so it also
# runs on vLLM)
SHIPPED_PERSRMS = ("default", "conditioned")


def default_persrm_dir(name: str = "default") -> Path | None:
    """The PersRM shipped inside the package under ``name``, if this build has one."""
    path = Path(str(resources.files("padlm") / "assets" / f"persrm-{name}"))
    return path if (path / CONFIG_NAME).exists() else None


def shipped_base(directory: Path) -> str:
    return json.loads((directory / CONFIG_NAME).read_text()).get("base_model", "")


def is_persrm_dir(path: Path) -> bool:
    """padlm's own PersRM layout (``config.json`` + ``head.safetensors``)."""
    return (path / CONFIG_NAME).exists() and (path / HEAD_NAME).exists()


def persrm_directory(spec: str) -> Path | None:
    """The directory ``spec`` names (a shipped name or a path), None for a model name."""
    if spec in SHIPPED_PERSRMS:
        shipped = default_persrm_dir(spec)
        if shipped is None:
            raise PadlmError(f"this build ships no PersRM {spec!r}: pass --persrm DIR",
                             param="persrm")
        return shipped
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def persrm_placement(spec: str | PersonalizedRewardModel | None, model_name: str) -> str:
    """Where the preference goes by default: the placement a PersRM made for this model was
    trained with, else the default (read from its config alone, before any weights load)."""
    if isinstance(spec, PersonalizedRewardModel):
        return spec.config.placement
    directory = persrm_directory(spec) if isinstance(spec, str) and spec != "identity" \
        else None
    if directory is None or not is_persrm_dir(directory):
        return DEFAULT_PLACEMENT
    config = PersonalizedRewardModel.read_config(directory)
    return config.placement if config.base_model == model_name else DEFAULT_PLACEMENT


def load_persrm(spec: str | PersonalizedRewardModel | None, lm: LoadedModel,
                reference: str | None = None) -> PersonalizedRewardModel:
    """Resolve ``--persrm`` for the base model ``lm``: ``identity``, a shipped name, a PersRM
    or guide-checkpoint directory, or a model (alias, directory, hub id) used as a guide.
    ``reference`` overrides the guide's saved reward reference."""
    if isinstance(spec, PersonalizedRewardModel):
        persrm = spec
    elif spec is None or spec == "identity":
        persrm = PersonalizedRewardModel.identity(lm.name, lm.model.config.hidden_size)
    else:
        persrm = _load_named(spec, lm)
    if reference is not None:
        persrm.reference = reference  # the setter refuses what this PersRM cannot run
    return persrm


def _load_named(spec: str, lm: LoadedModel) -> PersonalizedRewardModel:
    directory = persrm_directory(spec)
    if directory is not None and is_persrm_dir(directory):
        return _load_padlm_persrm(directory, lm, spec)
    if directory is not None:
        return _load_checkpoint(directory, lm)
    if spec.startswith((".", "/", "~")):
        raise PadlmError(f"PersRM directory {spec} does not exist", param="persrm")
    guide = _guide_model(spec, lm)
    separate = _separate(PersRMConfig(base_model=guide.name,
                                      hidden_size=guide.model.config.hidden_size,
                                      training={"stage": "none"}),
                         ValueHead(guide.model.config.hidden_size), guide, lm, None,
                         "guide-unconditioned", spec)
    log.info("guide %s (a whole causal LM, no head) steers %s as a separate model",
             guide.name, lm.name)
    return separate


def _load_padlm_persrm(directory: Path, lm: LoadedModel, spec: str
                       ) -> PersonalizedRewardModel:
    config = PersonalizedRewardModel.read_config(directory)
    if config.base_model == lm.name:
        # a LoRA PersRM wraps its own copy so the base model stays adapter-free
        loaded = PersonalizedRewardModel.load(
            directory, copy.deepcopy(lm.model) if config.lora else None)
        _check_hidden(directory, config.hidden_size, lm)
        return loaded
    guide = _guide_model(config.base_model, lm, f"PersRM {spec} (trained on "
                                                  f"{config.base_model})")
    _check_hidden(directory, config.hidden_size, guide)
    loaded = PersonalizedRewardModel.load(
        directory, copy.deepcopy(guide.model) if config.lora else None)
    if loaded.backbone is not None:  # the LoRA-adapted guide is the guide's backbone
        guide = LoadedModel(loaded.backbone, guide.tokenizer, guide.name)
    separate = _separate(config, loaded.head, guide, lm, str(directory), None, spec)
    log.info("PersRM %s was trained on %s, not %s: it runs as a separate guide model",
             spec, config.base_model, lm.name)
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
    """A guide with its own stream; refused unless it reads the base model's tokens."""
    from padlm.core.checkpoints import shared_vocabulary

    try:
        scoreable = shared_vocabulary(
            lm.tokenizer, guide.tokenizer, guide.model.get_output_embeddings().weight.shape[0],
            lm.name, guide.name)
    except PadlmError as error:
        raise PadlmError(f"--persrm {spec or path or guide.name} cannot steer {lm.name}: "
                         f"{error}", param="persrm") from None
    head.to(lm.device)
    return PersonalizedRewardModel(config, head, path=path, guide=guide, reference=reference,
                                   scoreable=scoreable)


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
