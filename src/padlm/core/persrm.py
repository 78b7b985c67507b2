"""The personalized reward model (PersRM) of PAD: a backbone plus a ``d x d`` value head.

``z_R(a | s, p) = E_a . (W h(s, p) + b)``. When the backbone is the frozen base model itself
(no LoRA), PAD needs no second forward: the head is applied to the base model's own final
hidden state, and only at the k candidate rows of the lm_head.

On disk a PersRM is a directory: ``config.json`` (what it was trained on and how), ``head.
safetensors`` (``weight``, ``bias``) and, for a LoRA stage, a PEFT ``adapter/`` directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from padlm.atomic import atomic_directory, write_json_atomic
from padlm.core.config import REWARD_REFERENCES
from padlm.core.prompting import DEFAULT_PLACEMENT
from padlm.errors import PadlmError

if TYPE_CHECKING:
    from padlm.core.models import LoadedModel
    from padlm.core.transduction import Transducer

CONFIG_NAME = "config.json"
HEAD_NAME = "head.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_NAME = "persrm"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
REFERENCES = ("conditioned", "unconditioned")  # what a head was trained against (see config)
# a PersRM that shares the base model's backbone has one backbone: "guide" means "base"
SHARED_SYNONYMS = {"guide": "base", "guide-unconditioned": "base-unconditioned"}


@dataclass
class PersRMConfig:
    """Everything needed to use a PersRM correctly, and to know where it came from."""

    base_model: str
    hidden_size: int
    recommended_weight: float = 1.0
    top_k: int = 10
    placement: str = DEFAULT_PLACEMENT
    lora: bool = False
    base_model_sha256: str | None = None
    # "conditioned": the reward's reference is the base model seeing the preference (PAD's
    # released code; one stream). "unconditioned": the base model without it (a second,
    # preference-free stream at decoding; with W = I this is Linear Alignment).
    reference: str = "conditioned"
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PersRMConfig:
        known = {f for f in cls.__dataclass_fields__}
        config = cls(**{key: value for key, value in data.items() if key in known})
        if config.reference not in REFERENCES:
            raise PadlmError(f"PersRM reference must be one of {', '.join(REFERENCES)}, "
                             f"not {config.reference!r}")
        return config

    @property
    def unconditioned(self) -> bool:
        return self.reference == "unconditioned"


class ValueHead(nn.Module):
    """``h -> W h + b``, identity-initialised so an untrained PersRM equals the base model.

    ``W`` and ``b`` stay float32 and ``W h + b`` is computed in float32 whatever the model's
    dtype: a trained head sits close to the identity, and in bfloat16 most of its diagonal's
    changes round away (1 + 1e-3 is 1 in bf16). The result is float32; PAD reads it at only
    k lm_head rows, which it upcasts, so its reward keeps the head's full precision.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden.float(), self.weight, self.bias)

    def is_identity(self) -> bool:
        eye = torch.eye(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        return bool(torch.equal(self.weight.data, eye) and not self.bias.data.any())


def candidate_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                     candidates: torch.Tensor) -> torch.Tensor:
    """``E_a . h`` at ``candidates [N, k]`` only, in float32: the k lm_head rows PAD's
    candidate-restricted softmax needs, not the whole vocabulary."""
    rows = lm_head_weight[candidates].float()  # [N, k, d]: k rows, cheap to upcast
    return torch.einsum("nkd,nd->nk", rows, hidden.float())


def tensor_fingerprint(header: str, tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits of sha256 over ``header`` and the tensors' float32 bytes, in order."""
    digest = hashlib.sha256(header.encode())
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class PersonalizedRewardModel:
    """A value head on a backbone: the base model's own (shared, the fast path), a LoRA-adapted
    copy of it, or a separate guide model with its own KV stream (any size; the same
    tokenizer as the base).

    ``reference`` is the token reward's reference rule
    (:data:`padlm.core.config.REWARD_REFERENCES`):
    by default what the head was trained against, on its own backbone (``conditioned`` ->
    ``base`` when that backbone is the base model, ``guide`` when it is a separate guide).
    """

    def __init__(
        self, config: PersRMConfig, head: ValueHead, backbone: nn.Module | None = None,
        path: str | None = None, guide: LoadedModel | None = None,
        reference: str | None = None, scoreable: int | None = None,
        transducer: Transducer | None = None,
    ) -> None:
        self.config = config
        self.head = head
        self.backbone = backbone  # a LoRA copy of the base model; None: the base's own
        self.path = path
        self.guide = guide  # a separate guide model (its own stream); None: the base's backbone
        # base-model token ids below this the guide can score (its shared vocabulary)
        self.scoreable = scoreable
        # a guide with its own tokenizer reads the base's tokens as text (None: as ids)
        self.transducer = transducer
        self.first_token_only = False  # PAD's released first-token mapping, for comparison
        # refused now, not at the first decode step; a rule set is kept in canonical form
        self._reference = None if reference is None else self.canonical_reference(reference)
        if reference is None:
            self.canonical_reference(self.trained_reference)

    @property
    def reference(self) -> str:
        """The reward reference rule in force: the one set, else the trained one (already
        canonical: ``base*`` on the base's backbone, ``guide*`` on a separate one)."""
        return self._reference or self.trained_reference

    @reference.setter
    def reference(self, rule: str) -> None:
        self._reference = self.canonical_reference(rule)

    @classmethod
    def identity(cls, base_model_name: str, hidden_size: int) -> PersonalizedRewardModel:
        config = PersRMConfig(base_model=base_model_name, hidden_size=hidden_size,
                              training={"stage": "none"})
        return cls(config, ValueHead(hidden_size))

    @property
    def shares_backbone(self) -> bool:
        return self.backbone is None and self.guide is None

    @property
    def separate(self) -> bool:
        return self.guide is not None

    @property
    def adapted(self) -> bool:
        """Whether the guide's backbone carries a PEFT adapter (named ``ADAPTER_NAME``)."""
        return self.guide is not None and hasattr(self.guide.model, "peft_config")

    @property
    def trained_reference(self) -> str:
        """The rule the head was trained for: against its own backbone, with or without the
        preference."""
        own = "guide" if self.separate else "base"
        return own + ("-unconditioned" if self.config.unconditioned else "")

    def canonical_reference(self, rule: str) -> str:
        """``rule`` as this PersRM runs it, or a refusal naming why it cannot."""
        if rule not in REWARD_REFERENCES:
            raise PadlmError(f"reference must be one of {', '.join(REWARD_REFERENCES)}, got "
                             f"{rule!r}", param="reference")
        if not self.separate:
            if rule == "none":
                raise PadlmError("reference none (the guide's log-probabilities as the reward) "
                                 "needs a separate guide model: this PersRM is a head on the "
                                 "base model", param="reference")
            return SHARED_SYNONYMS.get(rule, rule)
        if rule == "guide" and self.head.is_identity() and not self.adapted:
            raise PadlmError(f"reference guide compares the guide {self.guide.name} with itself "
                             f"(it has no head and no adapter): every reward would be 0; use "
                             f"guide-unconditioned or none", param="reference")
        return rule

    @property
    def name(self) -> str:
        """What users call it: its directory, or its guide model's name, or identity."""
        return self.path or (self.guide.name if self.guide is not None else "identity")

    def fingerprint(self) -> str:
        """A short hash of everything that shapes this PersRM's outputs (head, LoRA weights,
        default top-k): caches keyed by it never mix two PersRMs saved at the same path."""
        # a conditioned PersRM hashes as before these fields existed: old caches stay valid
        reference = ",reference=unconditioned" if self.config.unconditioned else ""
        if self.reference != self.trained_reference:
            reference += f",rule={self.reference}"
        if self.guide is not None:
            reference += f",guide={self.guide.name}"
        if self.transducer is not None:
            reference += ",alignment=" + ("first-token" if self.first_token_only else "text")
        tensors = [self.head.weight, self.head.bias]
        if self.backbone is not None:
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.backbone, adapter_name=ADAPTER_NAME)
            tensors += [state[name] for name in sorted(state)]
        return tensor_fingerprint(f"top_k={self.config.top_k}{reference}", tensors)

    def reward_logits(
        self, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``E (W h + b)``: over the whole vocabulary, or only at ``candidates [N, k]`` (the
        only rows PAD's candidate-restricted softmax needs)."""
        transformed = self.head(hidden)  # float32
        if candidates is None:  # the whole vocabulary: in the lm_head's dtype, as base logits
            return (transformed.to(lm_head_weight.dtype) @ lm_head_weight.T).float()
        return candidate_logits(transformed, lm_head_weight, candidates)

    def save(self, directory: str | Path) -> None:
        """Write the PersRM atomically: a crash leaves the old directory or the new one."""
        with atomic_directory(Path(directory)) as staging:
            save_file(
                {"weight": self.head.weight.detach().cpu().contiguous().float(),
                 "bias": self.head.bias.detach().cpu().contiguous().float()},
                str(staging / HEAD_NAME),
            )
            if self.backbone is not None:
                self.backbone.save_pretrained(str(staging / ADAPTER_DIR),
                                              selected_adapters=[ADAPTER_NAME])
                # PEFT nests a non-default adapter under adapter/<name>/; load reads adapter/
                nested = staging / ADAPTER_DIR / ADAPTER_NAME
                if nested.is_dir():
                    for path in list(nested.iterdir()):
                        path.replace(staging / ADAPTER_DIR / path.name)
                    nested.rmdir()
            write_json_atomic(staging / CONFIG_NAME, asdict(self.config))

    @staticmethod
    def read_config(directory: str | Path) -> PersRMConfig:
        """A PersRM directory's config alone (whether it needs a backbone copy, say)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.exists() or not (directory / HEAD_NAME).exists():
            raise PadlmError(f"{directory} is not a PersRM directory (no {CONFIG_NAME} or "
                             f"{HEAD_NAME})")
        try:
            return PersRMConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise PadlmError(f"{config_path} is not a valid PersRM config: {error}") from None

    @classmethod
    def load(cls, directory: str | Path, base_model: nn.Module | None = None,
             ) -> PersonalizedRewardModel:
        """Load a PersRM; a LoRA PersRM needs its own copy of the base model to wrap."""
        directory = Path(directory)
        config = cls.read_config(directory)
        tensors = load_file(str(directory / HEAD_NAME))
        head = ValueHead(config.hidden_size)
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        backbone = None
        if config.lora:
            if base_model is None:
                raise PadlmError("a LoRA PersRM needs a base model copy to load onto")
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(
                base_model, str(directory / ADAPTER_DIR), adapter_name=ADAPTER_NAME
            ).eval()
        return cls(config, head, backbone, path=str(directory))
