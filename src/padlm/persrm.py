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
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from padlm.atomic import atomic_directory, write_json_atomic
from padlm.errors import PadlmError
from padlm.prompting import DEFAULT_PLACEMENT

CONFIG_NAME = "config.json"
HEAD_NAME = "head.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_NAME = "persrm"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
REFERENCES = ("conditioned", "unconditioned")


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


def tensor_fingerprint(header: str, tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits of sha256 over ``header`` and the tensors' float32 bytes, in order."""
    digest = hashlib.sha256(header.encode())
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class PersonalizedRewardModel:
    """A value head, optionally on top of a LoRA-adapted copy of the base backbone."""

    def __init__(
        self, config: PersRMConfig, head: ValueHead, backbone: nn.Module | None = None,
        path: str | None = None,
    ) -> None:
        self.config = config
        self.head = head
        self.backbone = backbone  # None: shares the base model's backbone (fast path)
        self.path = path

    @classmethod
    def identity(cls, base_model_name: str, hidden_size: int) -> PersonalizedRewardModel:
        config = PersRMConfig(base_model=base_model_name, hidden_size=hidden_size,
                              training={"stage": "none"})
        return cls(config, ValueHead(hidden_size))

    @property
    def shares_backbone(self) -> bool:
        return self.backbone is None

    def fingerprint(self) -> str:
        """A short hash of everything that shapes this PersRM's outputs (head, LoRA weights,
        default top-k): caches keyed by it never mix two PersRMs saved at the same path."""
        # a conditioned PersRM hashes as before this field existed: old caches stay valid
        reference = ",reference=unconditioned" if self.config.unconditioned else ""
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
        rows = lm_head_weight[candidates].float()  # [N, k, d]: k rows, cheap to upcast
        return torch.einsum("nkd,nd->nk", rows, transformed)

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
