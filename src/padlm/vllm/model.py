"""vLLM model classes that keep the step's final hidden states for PAD (imported by vLLM).

vLLM's runners call ``model.compute_logits(hidden_states[logits_indices])``: exactly the final
normed hidden state ``h`` of every row the sampler will see, in the sampler's row order (V1
runner: ``gpu_model_runner.py``; the CPU runner subclasses it; Model Runner V2:
``gpu/model_runner.py`` ``sample``). ``compute_logits`` gets no sampling metadata (removed
upstream in PR #25345), so the model only keeps ``h``; the logits processor
(:mod:`padlm.vllm.processor`) reads it back through :func:`active_model` in the same process
and asks :meth:`PadModelMixin.reward_logits` for ``E_K (W h + b)`` at its candidates.

Exercised here: the CPU build, V1 runner, tensor parallel size 1. Written for, not run here:
CUDA, tensor parallelism (the lm_head is sharded by vocabulary: each rank scores the candidates
in its shard, one all-reduce of ``[rows, k]`` floats sums them), Model Runner V2 (same
``compute_logits`` call). Not supported: batch-sharded sampling (V2's
``compute_logits_local``; these classes do not define it, so vLLM turns it off), speculative
decoding (vLLM refuses custom logits processors with it), pipeline parallelism (untested: only
the last rank has the lm_head, where both the tap and the processor run).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from padlm.core.persrm import PersonalizedRewardModel
from padlm.errors import PadlmError
from padlm.vllm.requests import ADDITIONAL_CONFIG_KEY, check_persrm

_ACTIVE: weakref.ReferenceType[PadModelMixin] | None = None


def active_model() -> PadModelMixin:
    """The padlm model of this worker process (the logits processor runs beside it)."""
    model = _ACTIVE() if _ACTIVE is not None else None
    if model is None:
        raise PadlmError("a padlm request reached a vLLM model that is not a padlm "
                         "architecture: start vLLM with hf_overrides "
                         '{"architectures": ["PadlmLlamaForCausalLM"]} (or '
                         "PadlmQwen2ForCausalLM); padlm.vllm.engine does this")
    return model


def persrm_dir(vllm_config: VllmConfig) -> str | None:
    """The PersRM directory given as ``additional_config={"padlm": {"persrm": DIR}}``."""
    settings = vllm_config.additional_config or {}
    if not isinstance(settings, dict):
        return None
    return (settings.get(ADDITIONAL_CONFIG_KEY) or {}).get("persrm")


class PadModelMixin:
    """Keeps ``h`` of the last ``compute_logits`` call and the PersRM's value head.

    Put before vLLM's model class in the bases: ``__init__`` and ``compute_logits`` wrap it.
    The head is a plain attribute, not a submodule: vLLM's loader would otherwise look for
    its weights in the base model's checkpoint and fail on their absence.
    """

    lm_head: torch.nn.Module
    logits_processor: torch.nn.Module

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        global _ACTIVE
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.padlm_hidden: torch.Tensor | None = None
        self.padlm_persrm: PersonalizedRewardModel | None = None
        directory = persrm_dir(vllm_config)
        if directory is not None and not isinstance(self.lm_head, PPMissingLayer):
            self.padlm_persrm = self._load_persrm(directory, vllm_config)
        _ACTIVE = weakref.ref(self)

    def _load_persrm(self, directory: str, vllm_config: VllmConfig) -> PersonalizedRewardModel:
        """Load and check the PersRM on this rank's lm_head device, refusing what vLLM
        cannot run (see :func:`check_persrm`) and heads PAD cannot read: a quantized lm_head,
        or logits with a scale or soft cap, would make ``E_K (W h + b)`` differ from the
        logits it is compared with."""
        persrm = PersonalizedRewardModel.load(Path(directory))
        check_persrm(persrm.config, directory)
        hidden = vllm_config.model_config.hf_config.get_text_config().hidden_size
        if persrm.config.hidden_size != hidden:
            raise PadlmError(f"PersRM {directory} was made for hidden size "
                             f"{persrm.config.hidden_size}, the model has {hidden}")
        if not isinstance(getattr(self.lm_head, "quant_method", None),
                          UnquantizedEmbeddingMethod):
            raise PadlmError("PAD on the vllm engine needs an unquantized lm_head")
        if self.logits_processor.scale != 1.0 or self.logits_processor.soft_cap is not None:
            raise PadlmError("PAD on the vllm engine needs logits without scale or soft cap")
        persrm.head.to(self.lm_head.weight.device)
        return persrm

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        self.padlm_hidden = hidden_states
        return super().compute_logits(hidden_states)  # type: ignore[misc]

    def reward_logits(self, rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``E_K (W h + b)`` for the kept hidden rows ``rows [N]`` at ``candidates [N, k]``.

        With tensor parallelism each rank holds the lm_head rows of one vocabulary shard: it
        scores the candidates that fall in its shard, zeros elsewhere, and an all-reduce sums
        the shards (every rank runs the sampler on the all-gathered logits, so every rank
        takes part; untested here, one CPU process).
        """
        if self.padlm_persrm is None:
            raise PadlmError("this vLLM engine was started without a PersRM: pass "
                             'additional_config={"padlm": {"persrm": DIR}}', param="strategy")
        if self.padlm_hidden is None:
            raise PadlmError("no hidden states were kept for this step")
        hidden = self.padlm_hidden[rows]
        weight = self.lm_head.weight
        if get_tensor_model_parallel_world_size() == 1:
            return self.padlm_persrm.reward_logits(hidden, weight, candidates)
        shard = self.lm_head.shard_indices
        start, end = shard.org_vocab_start_index, shard.org_vocab_end_index
        local = (candidates >= start) & (candidates < end)
        local_ids = (candidates - start).clamp(0, max(end - start - 1, 0))
        partial = self.padlm_persrm.reward_logits(hidden, weight, local_ids)
        return tensor_model_parallel_all_reduce(partial.masked_fill(~local, 0.0))


class PadlmLlamaForCausalLM(PadModelMixin, LlamaForCausalLM):
    """vLLM's Llama, keeping ``h`` for PAD (SmolLM2, Llama 2/3, ...)."""


class PadlmQwen2ForCausalLM(PadModelMixin, Qwen2ForCausalLM):
    """vLLM's Qwen2, keeping ``h`` for PAD (Qwen2 / Qwen2.5)."""
