"""The frozen experts of orchestration (MoPE): one per P-Soups dimension, sharing a tokenizer.

Every expert reads its own dimension's preference text in its context (``context:
dimension``, the default) or the request's whole preference (``context: request``, the text a
soup reads), and a mixture request's experts are the lanes of ONE batched forward (rows with
different combinations included). Head experts reading one text need one forward, so they run
as one lane whose hidden state goes through each expert's head.

- ``prompted``: the base model with the dimension's text (training-free).
- ``head``: a prompted expert plus a value head ``E (W_i h + b_i)`` trained by DPO on that
  dimension's pairs only (the PersRM head trainer; :mod:`padlm.orchestration.train_experts`).
- ``lora``: a prompted expert plus a LoRA adapter per dimension; each row's lanes run their
  own adapters in one mixed-adapter forward (:class:`~padlm.orchestration.streams.
  AdapterLaneStream`).
- ``models``: one Hugging Face model per dimension, each its own stream (every model runs
  every row: separate weights cannot share a forward). They must share the base tokenizer.

On disk: ONE directory, ``config.json`` + ``experts.safetensors`` (heads ``head.<dim>.weight
/bias``, LoRA matrices ``lora.<dim>.<name>``), and a trained PCM in ``pcm/`` when there is one.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from padlm.atomic import atomic_directory, write_json_atomic
from padlm.core.kvstream import KVStream, StreamOutput, response_hidden
from padlm.core.models import LoadedModel, load_model
from padlm.core.persrm import ValueHead, tensor_fingerprint
from padlm.core.preferences import PRESETS, PSOUPS, Preference, preset_text
from padlm.core.prompting import DEFAULT_PLACEMENT, render
from padlm.errors import PadlmError
from padlm.orchestration.encoding import requested_experts
from padlm.orchestration.streams import AdapterLaneStream, LaneContext

FORMS = ("prompted", "head", "lora", "models")
CONTEXTS = ("dimension", "request")  # what each expert reads: its own text, or the request's
KIND = "padlm-experts"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "experts.safetensors"
PCM_DIR = "pcm"
MAX_LANES = 3  # a P-Soups request names at most one pole of each of the three axes
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

log = logging.getLogger(__name__)


def check_context(form: str, context: str) -> None:
    """Refuse a context the form cannot use (before anything is trained or loaded)."""
    if context not in CONTEXTS:
        raise PadlmError(f"unknown experts context {context!r}; choose {', '.join(CONTEXTS)}")
    if context == "request" and form == "prompted":
        raise PadlmError("prompted experts that all read the request are one model: that is "
                         "the prompt strategy; use context dimension")


@dataclass
class ExpertsConfig:
    """What the experts are and where they came from."""

    form: str
    dimensions: list[str]  # expert i is aligned to preference dimension i
    base_model: str
    hidden_size: int
    placement: str = DEFAULT_PLACEMENT
    models: list[str] = field(default_factory=list)  # form "models": one per dimension
    lora: dict[str, Any] = field(default_factory=dict)  # form "lora": rank, alpha, targets
    training: dict[str, Any] = field(default_factory=dict)
    context: str = "dimension"
    kind: str = KIND

    def __post_init__(self) -> None:
        check_context(self.form, self.context)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertsConfig:
        if data.get("kind") != KIND:
            raise PadlmError(f"not an experts config (kind {data.get('kind')!r})")
        config = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        if config.form not in FORMS:
            raise PadlmError(f"unknown experts form {config.form!r}; choose {', '.join(FORMS)}")
        unknown = [d for d in config.dimensions if d not in PRESETS]
        if unknown or not config.dimensions:
            raise PadlmError(f"experts need preset dimensions, got {config.dimensions}")
        return config


def check_tokenizer(base, other, base_name: str, other_name: str) -> None:
    """Refuse an expert whose tokenizer differs from the base's: their next-token
    distributions must be over one vocabulary to be mixed."""
    if base.get_vocab() != other.get_vocab() or base.eos_token_id != other.eos_token_id:
        raise PadlmError(
            f"expert {other_name} has a different tokenizer ({type(other).__name__}, "
            f"{len(other)} tokens, from {other.name_or_path}) than the base model {base_name} "
            f"({type(base).__name__}, {len(base)} tokens, from {base.name_or_path}): experts "
            "must share one tokenizer to be mixed")


class Experts:
    """Frozen experts over one base model, and (optionally) the PCM trained to mix them."""

    def __init__(self, config: ExpertsConfig, lm: LoadedModel,
                 heads: dict[str, ValueHead] | None = None,
                 backbone: torch.nn.Module | None = None,
                 models: Sequence[LoadedModel] = (), pcm=None, path: str | None = None,
                 ) -> None:
        self.config = config
        self.lm = lm
        self.heads = heads or {}
        self.backbone = backbone  # form "lora": a PEFT copy of the base, one adapter each
        self.models = list(models)
        self.pcm = pcm
        self.path = path
        self.lm_head = lm.model.get_output_embeddings().weight

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.config.dimensions)

    @property
    def lanes(self) -> int:
        return min(MAX_LANES, len(self.dimensions))

    def select(self, preference: Preference) -> tuple[str, ...]:
        """The experts a request asks for (see :func:`requested_experts`)."""
        return requested_experts(preference, self.dimensions, self.lanes)

    def lane_experts(self, experts: Sequence[str]) -> tuple[str, ...]:
        """A row's expert per lane: its experts, the last repeated to fill every lane (a
        stream has one lane count; a repeated lane gets weight 0)."""
        return (*experts, *[experts[-1]] * (self.lanes - len(experts)))

    # --- decoding: streams, contexts, per-lane logits and hidden states ---

    @property
    def one_lane(self) -> bool:
        """Head experts that all read the request: one forward serves every expert."""
        return self.config.form == "head" and self.config.context == "request"

    def new_streams(self) -> list[KVStream]:
        if self.config.form == "models":
            return [KVStream(model.model) for model in self.models]
        if self.config.form == "lora":
            return [AdapterLaneStream(self.backbone, self.lanes)]
        # head experts make their logits from the hidden states (head_logits)
        return [KVStream(self.lm.model, lanes=1 if self.one_lane else self.lanes,
                         logits=self.config.form != "head")]

    def contexts(self, prompt, experts: Sequence[str]) -> list[list[list[int]]]:
        """Per stream, per lane: the prompt with what that expert reads in context."""
        lanes = self.lane_experts(experts)
        shared = (self.render_request(prompt, experts)
                  if self.config.context == "request" else None)

        def reads(dimension: str) -> list[int]:
            return shared if shared is not None else self._render(prompt, PRESETS[dimension])

        if self.config.form == "models":
            return [[reads(d)] for d in self.dimensions]
        if self.config.form == "lora":
            return [[LaneContext(reads(d), d) for d in lanes]]
        if self.one_lane:
            return [[shared]]
        return [[reads(d) for d in lanes]]

    def render_request(self, prompt, experts: Sequence[str]) -> list[int]:
        """The prompt with the request's whole preference (what a soup, and experts with
        context ``request``, read)."""
        return self._render(prompt, preset_text(experts))

    def _render(self, prompt, text: str) -> list[int]:
        return render(self.lm.tokenizer, prompt, text, self.config.placement)

    def logits(self, outputs: list[StreamOutput], lanes: Sequence[Sequence[str]]
               ) -> torch.Tensor:
        """``[rows, lanes, vocab]``: each lane's expert's next-token logits."""
        if self.config.form == "models":
            return self._gather_models([out.logits[:, 0] for out in outputs], lanes)
        if self.config.form == "head":
            hidden = self.hidden(outputs, lanes)
            flat = [d for row in lanes for d in row]
            return self.head_logits(hidden.reshape(-1, hidden.shape[-1]), flat).view(
                hidden.shape[0], hidden.shape[1], -1)
        return outputs[0].logits

    def hidden(self, outputs: list[StreamOutput], lanes: Sequence[Sequence[str]]
               ) -> torch.Tensor:
        """``[rows, lanes, d]``: each lane's final hidden state (what the PCM reads)."""
        if self.config.form == "models":
            return self._gather_models([out.hidden[:, 0] for out in outputs], lanes)
        if self.one_lane:
            return outputs[0].hidden.expand(-1, self.lanes, -1)
        return outputs[0].hidden

    def _gather_models(self, per_model: list[torch.Tensor], lanes: Sequence[Sequence[str]]
                       ) -> torch.Tensor:
        stacked = torch.stack(per_model, dim=1)  # [rows, models, ...]
        index = torch.tensor([[self.dimensions.index(d) for d in row] for row in lanes],
                             device=stacked.device)
        return stacked[torch.arange(len(lanes), device=stacked.device)[:, None], index]

    def head_logits(self, hidden: torch.Tensor, dimensions: Sequence[str]) -> torch.Tensor:
        """``E (W_d h + b_d)`` for each row of ``hidden [N, d]`` with its dimension's head."""
        transformed = hidden.clone()
        for dimension in set(dimensions):
            at = torch.tensor([d == dimension for d in dimensions], device=hidden.device)
            transformed[at] = self.heads[dimension](hidden[at]).to(hidden.dtype)
        return (transformed.to(self.lm_head.dtype) @ self.lm_head.T).float()

    # --- whole responses (PCM training: the experts' views of sampled responses) ---

    def response_states(self, prompts: Sequence, lanes: Sequence[Sequence[str]],
                        responses: Sequence[Sequence[int]]
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per response: ``hidden [T, lanes, d]`` (the state before each token, as decoding
        saw it) and ``log p_expert(y_t) [T, lanes]`` for each lane's expert; one batched
        forward per stream, so the PCM can be retrained without running the experts again."""
        contexts = [self.contexts(p, row) for p, row in zip(prompts, lanes, strict=True)]
        hidden_of = {}  # (stream, row, stream lane) -> [T, d]
        for s, model in enumerate(self.stream_models()):
            flat = [(i, k, lane) for i, ctx in enumerate(contexts)
                    for k, lane in enumerate(ctx[s])]
            ids = [list(lane) for *_, lane in flat]
            targets = [responses[i] for i, *_ in flat]
            if self.config.form == "lora":
                with model._enable_peft_forward_hooks(adapter_names=[c.adapter for *_, c
                                                                     in flat]):
                    hidden = response_hidden(model, ids, targets)
            else:
                hidden = response_hidden(model, ids, targets)
            hidden_of.update({(s, i, k): h for (i, k, _), h in zip(flat, hidden, strict=True)})
        results = []
        with torch.inference_mode():
            for i, (row, response) in enumerate(zip(lanes, responses, strict=True)):
                experts = self.lane_experts(row)
                sources = [self._lane_source(i, j, d) for j, d in enumerate(experts)]
                states = [hidden_of[source] for source in sources]
                index = torch.tensor(response, device=states[0].device)[:, None]
                log_probs = [self._expert_logits(state, d, source[0]).log_softmax(-1)
                             .gather(1, index)[:, 0]
                             for state, d, source in zip(states, experts, sources, strict=True)]
                results.append((torch.stack(states, dim=1).float(),
                                torch.stack(log_probs, dim=1)))
        return results

    def _lane_source(self, row: int, lane: int, dimension: str) -> tuple[int, int, int]:
        """Which (stream, row, stream lane) forward lane ``lane``'s expert reads."""
        if self.config.form == "models":
            return self.dimensions.index(dimension), row, 0
        return 0, row, 0 if self.one_lane else lane

    def _expert_logits(self, hidden: torch.Tensor, dimension: str, stream: int
                       ) -> torch.Tensor:
        """``[T, vocab]`` logits of one expert from its hidden states."""
        if self.config.form == "head":
            return self.head_logits(hidden, [dimension] * len(hidden))
        head = self.stream_models()[stream].get_output_embeddings().weight
        return (hidden.to(head.dtype) @ head.T).float()

    def stream_models(self) -> list[torch.nn.Module]:
        """The models whose forwards the experts' streams run."""
        if self.config.form == "models":
            return [model.model for model in self.models]
        return [self.backbone if self.config.form == "lora" else self.lm.model]

    # --- saving and loading ---

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything ``experts.safetensors`` holds."""
        out = {}
        for dimension, head in self.heads.items():
            out[f"head.{dimension}.weight"] = head.weight.detach().float().cpu().contiguous()
            out[f"head.{dimension}.bias"] = head.bias.detach().float().cpu().contiguous()
        if self.backbone is not None:
            for dimension in self.dimensions:
                for name, tensor in lora_state(self.backbone, dimension).items():
                    out[f"lora.{dimension}.{name}"] = tensor.detach().float().cpu().contiguous()
        return out

    def fingerprint(self) -> str:
        """A short hash of what shapes the mixture's outputs (form, experts, placement,
        weights, PCM), so evaluation caches never mix two experts saved at one path."""
        shape = {key: value for key, value in asdict(self.config).items() if key != "training"}
        pcm = {} if self.pcm is None else {f"pcm.{k}": v for k, v in
                                           self.pcm.state_dict().items()}
        tensors = dict(sorted({**self.tensors(), **pcm}.items()))
        return tensor_fingerprint(json.dumps([shape, list(tensors)], sort_keys=True),
                                  tensors.values())

    def write(self, directory: Path) -> None:
        """Write config and weights into an existing (staging) directory."""
        save_file(self.tensors(), str(directory / WEIGHTS_NAME))
        write_json_atomic(directory / CONFIG_NAME, asdict(self.config))
        if self.pcm is not None:
            (directory / PCM_DIR).mkdir()
            self.pcm.write(directory / PCM_DIR)

    def save(self, directory: str | Path) -> None:
        """Atomically: a crash leaves the old directory or the new one, never a mix."""
        with atomic_directory(Path(directory)) as staging:
            self.write(staging)
        self.path = str(directory)


def prompted_experts(lm: LoadedModel, dimensions: Sequence[str] = tuple(PSOUPS),
                     placement: str = DEFAULT_PLACEMENT, context: str = "dimension") -> Experts:
    """Training-free experts: the base model with each dimension's text in its context."""
    config = ExpertsConfig("prompted", list(dimensions), lm.name,
                           lm.model.config.hidden_size, placement, context=context)
    return Experts(config, lm)


def lora_config(lora: dict[str, Any]):
    """The PEFT config of every adapter of a LoRA experts directory (saved as ``lora``)."""
    from peft import LoraConfig

    return LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                      target_modules=list(lora["targets"]), lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def add_adapter(model: torch.nn.Module, name: str, state: dict[str, torch.Tensor],
                lora: dict[str, Any]) -> None:
    """Add adapter ``name`` with the given weights to a PEFT model."""
    from peft import set_peft_model_state_dict

    model.add_adapter(name, lora_config(lora))
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()},
                              adapter_name=name)


def lora_backbone(lm: LoadedModel, states: dict[str, dict[str, torch.Tensor]],
                  lora: dict[str, Any]) -> torch.nn.Module:
    """A copy of the base model with one LoRA adapter per dimension, named by it (so a
    mixed-adapter forward can run each row's experts)."""
    from peft import get_peft_model, set_peft_model_state_dict

    first, *rest = states
    model = get_peft_model(copy.deepcopy(lm.model), lora_config(lora), adapter_name=first)
    set_peft_model_state_dict(model, {k: v.to(lm.device) for k, v in states[first].items()},
                              adapter_name=first)
    for name in rest:
        add_adapter(model, name, states[name], lora)
    return model.eval()


def lora_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s LoRA matrices, keyed as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def model_experts(lm: LoadedModel, models: Sequence[str], dimensions: Sequence[str],
                  placement: str = DEFAULT_PLACEMENT, context: str = "dimension") -> Experts:
    """Experts that are whole Hugging Face models (ids or directories), one per dimension."""
    if len(models) != len(dimensions):
        raise PadlmError(f"{len(models)} expert models for {len(dimensions)} dimensions: "
                         "give one model per dimension")
    loaded = [load_model(name, lm.model.dtype, lm.device) for name in models]
    for name, expert in zip(models, loaded, strict=True):
        check_tokenizer(lm.tokenizer, expert.tokenizer, lm.name, name)
    config = ExpertsConfig("models", list(dimensions), lm.name, lm.model.config.hidden_size,
                           placement, models=list(models), context=context)
    return Experts(config, lm, models=loaded)


def engine_experts(engine) -> Experts:
    """The experts an engine's ``mix`` and ``soups`` (and the evaluation and benchmarks) read:
    its ``experts`` component (a path, ``"default"`` or an :class:`Experts`), loaded once."""
    return engine.component("experts", lambda setting: (
        setting if isinstance(setting, Experts) else load_experts(setting, engine.lm)))


def load_experts(path: str | Path, lm: LoadedModel) -> Experts:
    """Experts (and their PCM, when the directory has one) for ``lm``. ``"default"``: the
    shipped experts for the default model if this build has them, else prompted experts."""
    if str(path) == "default":
        shipped = default_experts_dir()
        if shipped is None or _base_model(shipped) != lm.name:
            # the shipped heads read the hidden states of the model they were trained on
            log.info("the shipped experts were trained on %s, not %s: mix and soups use "
                     "prompted experts of %s (its own model, each dimension in its context)",
                     _base_model(shipped) if shipped else "no model in this build", lm.name,
                     lm.name)
            return prompted_experts(lm)
        path = shipped
    directory = Path(path)
    if not (directory / CONFIG_NAME).exists():
        raise PadlmError(f"{directory} is not an experts directory (no {CONFIG_NAME})")
    try:
        config = ExpertsConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise PadlmError(f"{directory / CONFIG_NAME} is not a valid experts config: "
                         f"{error}") from None
    if config.hidden_size != lm.model.config.hidden_size:
        raise PadlmError(f"experts {directory} were made for hidden size {config.hidden_size}, "
                         f"the model has {lm.model.config.hidden_size}")
    if config.form == "models":
        experts = model_experts(lm, config.models, config.dimensions, config.placement)
        experts.config = config
    else:
        tensors = load_file(str(directory / WEIGHTS_NAME), device=str(lm.device))
        heads, backbone = {}, None
        if config.form == "head":
            for dimension in config.dimensions:
                heads[dimension] = ValueHead(config.hidden_size).to(lm.device)
                with torch.no_grad():
                    heads[dimension].weight.copy_(tensors[f"head.{dimension}.weight"])
                    heads[dimension].bias.copy_(tensors[f"head.{dimension}.bias"])
        if config.form == "lora":
            states = {d: {name.removeprefix(f"lora.{d}."): t for name, t in tensors.items()
                          if name.startswith(f"lora.{d}.")} for d in config.dimensions}
            backbone = lora_backbone(lm, states, config.lora)
        experts = Experts(config, lm, heads, backbone)
    experts.path = str(directory)
    if (directory / PCM_DIR / CONFIG_NAME).exists():
        from padlm.orchestration.pcm import PreferenceControlModel

        experts.pcm = PreferenceControlModel.load(directory / PCM_DIR).to(lm.device)
    return experts


def default_experts_dir() -> Path | None:
    """The experts (with PCM) shipped in the package for the default model, if any."""
    path = Path(str(resources.files("padlm") / "assets" / "orchestration-default"))
    return path if (path / CONFIG_NAME).exists() else None


def _base_model(directory: Path) -> str:
    return json.loads((directory / CONFIG_NAME).read_text()).get("base_model", "")
