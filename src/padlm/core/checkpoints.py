"""Other people's guide checkpoints: recognise how a directory was saved and what it is for.

A guide is a model that steers the base model's decoding at the token level. Three layouts
occur in the wild, and each implies a different reward reference:

``pad-released``
    PAD's released PersRM: a full causal LM plus ``value_head.safetensors`` (or ``.bin``)
    holding ``v_head.summary.weight [H, H]`` and ``v_head.summary.bias [H]``, optionally
    under TRL's ``pretrained_model.`` prefix. The reward is ``E (W h + b)`` against the base
    model that sees the preference (reference `base`).
``causal-lm``
    A plain causal LM whose log-probabilities are the reward (GenARM's autoregressive reward
    models, a DPO-trained model, a small instruct model); its reference is the same model
    without the preference.
``peft-adapter``
    A PEFT adapter over a base model named in ``adapter_config.json``; its reference is the
    same backbone with the adapter disabled.

Everything else is refused with a message that names the file and says what the thing is
good for instead: a classification reward model or a scalar value head scores whole responses
(ARGS / best-of-n), not next tokens. Inspecting reads only JSON and the small head tensors;
:func:`load_guide_model` loads the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from padlm.core.models import LoadedModel, load_model
from padlm.core.persrm import ADAPTER_NAME
from padlm.errors import PadlmError

GUIDE_LAYOUTS = ("pad-released", "causal-lm", "peft-adapter")

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# from_pretrained reads any of these; a directory with none of them has no weights to load
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.bin")  # preferred first
HEAD_WEIGHT_KEY = "v_head.summary.weight"
HEAD_BIAS_KEY = "v_head.summary.bias"
TRL_PREFIX = "pretrained_model."
# architecture-name endings of models that score a whole response with a scalar
SCORER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForRewardModel",
                   "RewardModel", "ForScoring")
# config keys different model families use for the width of the final hidden state
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")

REFERENCE_BY_LAYOUT = {
    "pad-released": "base",  # PAD's released rule: vs the base model with the preference
    "peft-adapter": "guide",  # vs the same backbone without its adapter
    "causal-lm": "guide-unconditioned",  # vs the same model without the preference
}


@dataclass
class GuideCheckpoint:
    """A guide checkpoint as found on disk (nothing loaded but the small head tensors)."""

    layout: str  # one of GUIDE_LAYOUTS
    path: str  # the directory given
    # what load_model gets for the guide's backbone: the directory itself, or (peft-adapter)
    # the adapter's base_model_name_or_path as written in adapter_config.json
    model: str
    adapter: str | None  # the PEFT adapter directory (peft-adapter), else None
    # (W [H, H], b [H]) float32 from a value-head file (pad-released, or a peft-adapter that
    # ships one); None means the identity head
    head: tuple[torch.Tensor, torch.Tensor] | None
    default_reference: str  # a rule of padlm.core.config.REWARD_REFERENCES
    warnings: tuple[str, ...] = ()  # one-line warnings for the caller to log


class _HasVocabulary(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


# --- small readers ------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``, or a PadlmError naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PadlmError(f"cannot read {file}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PadlmError(f"{file} is not a JSON object")
    return data


def _summary(error: BaseException, limit: int = 300) -> str:
    """One line from a library's error: its first line, and the next when the first only
    announces a list (torch's "Error(s) in loading state_dict for X:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _present(directory: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if (directory / name).is_file()]


def _hidden_size(config: Mapping[str, Any]) -> int | None:
    """The final hidden state's width as a ``config.json`` states it (None: it does not)."""
    for key in HIDDEN_SIZE_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return _hidden_size(text) if isinstance(text, Mapping) else None


def _causal_lm_names() -> tuple[set[str], set[str]]:
    """(model types, architecture class names) AutoModelForCausalLM accepts."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        classes.update([value] if isinstance(value, str) else value)
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), classes


def _is_causal_architecture(name: str, known: set[str]) -> bool:
    return name in known or name.endswith(("ForCausalLM", "LMHeadModel"))


def _check_causal_lm(config_file: Path, config: Mapping[str, Any]) -> None:
    """Refuse a ``config.json`` that does not describe a causal LM, saying what it is for."""
    model_types, classes = _causal_lm_names()
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures:
        if _is_causal_architecture(name, classes):
            continue
        if name.endswith(SCORER_SUFFIXES):
            raise PadlmError(
                f"{config_file} declares {name}: a sequence-classification reward model scores "
                "whole responses; use it to score ARGS / best-of-n, not as a PAD guide (a guide "
                "needs next-token logits)")
        raise PadlmError(f"{config_file} declares {name}, not a causal LM: a PAD guide needs "
                         "next-token logits over the vocabulary")
    if not architectures and config.get("model_type") not in model_types:
        raise PadlmError(
            f"{config_file} names no architectures and its model_type "
            f"{config.get('model_type')!r} is not a causal LM transformers knows: a PAD guide "
            "must be a causal LM")


# --- value heads --------------------------------------------------------------------------


def _load_head_file(file: Path) -> dict[str, Any]:
    """The tensors in a value-head file; pickles only through ``weights_only`` (a ``.bin``
    from someone else must not run code)."""
    try:
        if file.suffix == ".safetensors":
            return dict(load_file(str(file)))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # OSError, UnpicklingError, safetensors' SafetensorError, ...
        raise PadlmError(f"cannot read value head {file}: {_summary(error)}") from None
    if not isinstance(state, Mapping):
        raise PadlmError(f"value head {file} holds a {type(state).__name__}, not a state dict "
                         f"with {HEAD_WEIGHT_KEY} and {HEAD_BIAS_KEY}")
    return dict(state)


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without TRL's ``pretrained_model.`` prefix (unprefixed keys are kept as they are)."""
    return {key.removeprefix(TRL_PREFIX): value for key, value in state.items()}


def _head_tensors(file: Path, state: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` from a loaded state dict, or a refusal naming the keys the file has."""
    tensors = _strip_prefix(state)
    weight, bias = tensors.get(HEAD_WEIGHT_KEY), tensors.get(HEAD_BIAS_KEY)
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        keys = sorted(state)
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        raise PadlmError(f"value head {file} must hold {HEAD_WEIGHT_KEY} and {HEAD_BIAS_KEY} "
                         f"(optionally prefixed {TRL_PREFIX!r}); it has: {shown or 'no keys'}")
    return weight, bias


def _check_head_shapes(file: Path, weight: torch.Tensor, bias: torch.Tensor,
                       hidden_size: int | None) -> None:
    """A PAD head maps the hidden state to a hidden state: ``W [H, H]``, ``b [H]``."""
    if weight.dim() == 2 and weight.shape[0] == 1:
        raise PadlmError(
            f"value head {file} is a scalar head (weight {list(weight.shape)}): it scores "
            "whole responses (an ARGS / best-of-n scorer, like TRL's PPO value head), not a "
            f"PAD token-level guide, which needs a [{weight.shape[1]}, {weight.shape[1]}] head")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise PadlmError(f"value head {file} has weight shape {list(weight.shape)}; a PAD head "
                         "is square, [hidden, hidden]")
    width = weight.shape[0]
    if list(bias.shape) != [width]:
        raise PadlmError(f"value head {file} has bias shape {list(bias.shape)}; its weight "
                         f"{list(weight.shape)} needs a bias of [{width}]")
    if hidden_size is not None and width != hidden_size:
        raise PadlmError(f"value head {file} is {width} wide but the model's hidden_size is "
                         f"{hidden_size}: the head belongs to another model")


def _value_head_file(directory: Path) -> tuple[Path | None, tuple[str, ...]]:
    """The value-head file to read (safetensors first) and a warning when both exist."""
    present = _present(directory, VALUE_HEAD_FILES)
    if not present:
        return None, ()
    warnings: tuple[str, ...] = ()
    if len(present) > 1:
        warnings = (f"{directory} holds both {' and '.join(present)}; using {present[0]}",)
    return directory / present[0], warnings


def read_value_head(directory: Path, hidden_size: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PAD's released value head in ``directory`` as float32 ``(W [H, H], b [H])``; None when
    the directory has no value-head file (the identity head, as PAD's released code behaves).

    ``hidden_size`` is the backbone's width the head must match (None: not checked). A file
    that is there but unreadable, incomplete, scalar or of the wrong width is refused: using
    the identity instead would silently decode with another model than the one asked for."""
    file, _ = _value_head_file(Path(directory))
    if file is None:
        return None
    weight, bias = _head_tensors(file, _load_head_file(file))
    _check_head_shapes(file, weight, bias, hidden_size)
    return weight.detach().float().contiguous(), bias.detach().float().contiguous()


# --- layouts ------------------------------------------------------------------------------


def _inspect_adapter(directory: Path) -> GuideCheckpoint:
    """A PEFT adapter: its base model as written, and a value head if it ships one."""
    config_file = directory / ADAPTER_CONFIG_FILE
    config = _read_json(config_file)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise PadlmError(f"{config_file} has no base_model_name_or_path: padlm cannot tell "
                         "which model the adapter belongs to")
    if not _present(directory, ADAPTER_WEIGHT_FILES):
        raise PadlmError(f"{directory} has {ADAPTER_CONFIG_FILE} but no adapter weights "
                         f"(looked for {', '.join(ADAPTER_WEIGHT_FILES)})")
    head = None
    file, warnings = _value_head_file(directory)
    if file is not None:
        base_config = Path(base).expanduser() / CONFIG_FILE
        hidden = _hidden_size(_read_json(base_config)) if base_config.is_file() else None
        if hidden is None:
            warnings += (f"{file.name}'s width is not checked against {base}'s hidden_size "
                         "(not a local model directory); a mismatch fails at decoding",)
        head = read_value_head(directory, hidden)
    return GuideCheckpoint("peft-adapter", str(directory), base, str(directory), head,
                           REFERENCE_BY_LAYOUT["peft-adapter"], warnings)


def _inspect_model_dir(directory: Path) -> GuideCheckpoint:
    """A full model directory: a causal LM with (pad-released) or without (causal-lm) a head."""
    config_file = directory / CONFIG_FILE
    config = _read_json(config_file)
    _check_causal_lm(config_file, config)
    if not _present(directory, MODEL_WEIGHT_FILES):
        raise PadlmError(f"{directory} has {CONFIG_FILE} but no model weights (looked for "
                         f"{', '.join(MODEL_WEIGHT_FILES)})")
    hidden = _hidden_size(config)
    file, warnings = _value_head_file(directory)
    if file is not None and hidden is None:
        warnings += (f"{config_file} states no hidden_size; {file.name}'s width is not "
                     "checked against the model",)
    head = read_value_head(directory, hidden)
    layout = "causal-lm" if head is None else "pad-released"
    return GuideCheckpoint(layout, str(directory), str(directory), None, head,
                           REFERENCE_BY_LAYOUT[layout], warnings)


def inspect_guide(path: str | Path) -> GuideCheckpoint:
    """Recognise a guide checkpoint's layout from the files in ``path``.

    Dispatch order: an ``adapter_config.json`` makes a PEFT adapter (it may sit next to a
    ``config.json`` copied from the base); otherwise a ``config.json`` must describe a causal
    LM, and a value-head file beside it makes PAD's released layout. Anything else is refused
    with the file and the reason."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise PadlmError(f"guide checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise PadlmError(f"guide checkpoint {directory} is a file; a guide is a directory "
                         f"holding {ADAPTER_CONFIG_FILE} or {CONFIG_FILE}")
    if (directory / ADAPTER_CONFIG_FILE).is_file():
        return _inspect_adapter(directory)
    if (directory / CONFIG_FILE).is_file():
        return _inspect_model_dir(directory)
    heads = _present(directory, VALUE_HEAD_FILES)
    if heads:
        raise PadlmError(f"{directory / heads[0]} has no {CONFIG_FILE} beside it: a value head "
                         "needs the causal LM it was trained on saved in the same directory")
    raise PadlmError(
        f"{directory} is not a guide checkpoint: looked for {ADAPTER_CONFIG_FILE} (a PEFT "
        f"adapter), {CONFIG_FILE} with {' or '.join(MODEL_WEIGHT_FILES[::2])} (a causal LM) "
        f"and {' or '.join(VALUE_HEAD_FILES)} (PAD's released value head)")


def load_guide_model(checkpoint: GuideCheckpoint, dtype: str | torch.dtype | None = None,
                     device: str | torch.device = "auto") -> LoadedModel:
    """The guide's model ready for decoding: the causal LM itself, or for an adapter its base
    wrapped in a PeftModel whose adapter is named ``persrm`` (so ``disable_adapter()`` gives
    the "guide" reference without a second copy of the weights)."""
    if checkpoint.layout not in GUIDE_LAYOUTS:
        raise PadlmError(f"unknown guide layout {checkpoint.layout!r}; "
                         f"one of {', '.join(GUIDE_LAYOUTS)}")
    loaded = load_model(checkpoint.model, dtype, device)
    if checkpoint.layout != "peft-adapter":
        return loaded
    from peft import PeftModel

    assert checkpoint.adapter is not None
    try:
        model = PeftModel.from_pretrained(loaded.model, checkpoint.adapter,
                                          adapter_name=ADAPTER_NAME)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise PadlmError(f"adapter {checkpoint.adapter} does not load onto {checkpoint.model}: "
                         f"{_summary(error)}") from None
    return LoadedModel(model=model.eval(), tokenizer=loaded.tokenizer, name=checkpoint.adapter)


# --- vocabularies -------------------------------------------------------------------------


def _token_at(vocab: Mapping[str, int], index: int) -> str | None:
    """The token a vocabulary maps to ``index`` (one linear scan: only used for messages)."""
    return next((token for token, i in vocab.items() if i == index), None)


def shared_vocabulary(base_tokenizer: _HasVocabulary, guide_tokenizer: _HasVocabulary,
                      guide_rows: int, base_name: str, guide_name: str) -> int:
    """How many ids ``0..n-1`` of the base's candidates the guide can score.

    The guide must share the base's tokenizer up to the smaller of the two vocabularies:
    a guide may extend it with added tokens (GenARM's 32001-token ARMs over Llama-2's 32000),
    pad its embedding matrix beyond its tokenizer (Qwen: 151936 rows for 151665 tokens), or
    lack tokens the base added at its end. ``n`` is the smallest of the base's vocabulary,
    the guide's and ``guide_rows``; every base token below ``n`` must have the same id in the
    guide, otherwise the guide scores different text than the base proposes and is refused.
    One pass over two dicts: fast for 150k-token vocabularies."""
    base, guide = base_tokenizer.get_vocab(), guide_tokenizer.get_vocab()
    base_size = max(base.values(), default=-1) + 1
    guide_size = max(guide.values(), default=-1) + 1
    shared = min(base_size, guide_size, guide_rows)
    if base == guide:
        return shared
    disagreeing = [index for token, index in base.items()
                   if index < shared and guide.get(token) != index]
    if not disagreeing:
        return shared
    first = min(disagreeing)
    token = _token_at(base, first)
    elsewhere = guide.get(token) if token is not None else None
    where = f"at id {elsewhere}" if elsewhere is not None else "nowhere"
    raise PadlmError(
        f"guide {guide_name} (vocabulary {len(guide)}, {guide_rows} rows) does not share the "
        f"tokenizer of base {base_name} (vocabulary {len(base)}): id {first} is {token!r} for "
        f"the base but {_token_at(guide, first)!r} for the guide, which has {token!r} {where}; "
        "a guide must use the base model's tokenizer")
