"""PAD as a vLLM logits processor: one class for both of vLLM's model runners.

Pass it by name, ``logits_processors=["padlm.vllm.processor:PadLogitsProcessor"]`` (CLI:
``--logits-processors``); :mod:`padlm.vllm.engine` does. It implements both interfaces, V1's
(``vllm.v1.sample.logits_processor``: ``update_state`` with batch moves, ``apply(logits)``)
and Model Runner V2's (``vllm.v1.worker.gpu.sample.logits_processor``: ``add_request`` per
slot, ``apply(logits, ctx)``), so the same name works whichever runner vLLM picks (V2 is the
default where Triton runs, i.e. GPUs; this CPU build runs V1). It is deliberately not an
entry point of ``vllm.logits_processors``: those load into every vLLM engine of the
environment, and this one refuses to start without a padlm architecture and a PersRM.

Per step, for the rows whose ``SamplingParams.extra_args`` ask for PAD (see
:func:`padlm.vllm.requests.pad_args`), it takes the top-k of the row's logits, asks the model
for the PersRM logits at those k rows of the lm_head (:mod:`padlm.vllm.model` kept ``h``),
and writes PAD's scores back (``-inf`` off the candidates): the math is
:mod:`padlm.core.guidance`'s, as on the HF engine. Other rows are untouched.

padlm's repetition control (``padlm_no_repeat_ngram_size``, ``padlm_repetition_penalty``)
of a PAD row happens here, as on the HF engine: the candidates and the proposal come from the
controlled logits, the reward from the raw ones. (vLLM's own repetition penalty counts the
prompt and runs before this processor on V1, after it on V2: padlm never sets it.)
Temperature, top-p and min-p come after it in both runners, as on the HF engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from padlm.core import guidance
from padlm.errors import PadlmError
from padlm.vllm.repetition import controlled
from padlm.vllm.requests import ARCHITECTURES, RepetitionArgs, pad_args, repetition_args
from padlm.vllm.rows import ActiveRow, TrackedRowsProcessor

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext


@dataclass(frozen=True)
class PadRow:
    """A PAD request's resolved settings in the batch."""

    weight: float
    top_k: int
    guarded: torch.Tensor | None  # the echo guard's token ids, None without the guard
    repetition: RepetitionArgs | None = None


class PadLogitsProcessor(TrackedRowsProcessor[PadRow]):
    """PAD for the rows that ask for it (see the module docstring for the two runners)."""

    def __init__(self, vllm_config: VllmConfig, *runner_args: Any) -> None:
        from padlm.vllm.model import persrm_dir

        padlm_architectures = set(ARCHITECTURES.values())
        if not padlm_architectures & set(vllm_config.model_config.architectures):
            raise PadlmError("padlm's PAD logits processor needs a padlm architecture: start "
                             f"vLLM with hf_overrides {{\"architectures\": [one of "
                             f"{', '.join(sorted(padlm_architectures))}]}}")
        if persrm_dir(vllm_config) is None:
            raise PadlmError("padlm's PAD logits processor needs a PersRM: start vLLM with "
                             'additional_config={"padlm": {"persrm": DIR}}')
        super().__init__(vllm_config, *runner_args)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the frontend at admission: a bad setting is an HTTP 400, not a crash."""
        pad_args(sampling_params.extra_args)
        repetition_args(sampling_params.extra_args)

    @cached_property
    def _tokenizer(self):
        """Loaded on the first echo-guarded request: the guard's ids are token ids of the
        preference's words."""
        from transformers import AutoTokenizer

        config = self.vllm_config.model_config
        return AutoTokenizer.from_pretrained(config.tokenizer,
                                             trust_remote_code=config.trust_remote_code)

    def settings_of(self, params: SamplingParams) -> PadRow | None:
        args = pad_args(params.extra_args)
        if args is None:
            return None
        from padlm.core.prompting import preference_token_ids
        from padlm.core.strategies import DEFAULT_TOP_K
        from padlm.vllm.model import active_model

        saved = active_model().padlm_persrm.config
        guarded = None
        if args.echo_guard:
            guarded = torch.tensor(preference_token_ids(self._tokenizer, args.preference),
                                   dtype=torch.long)
        return PadRow(saved.recommended_weight if args.weight is None else args.weight,
                      args.top_k or saved.top_k or DEFAULT_TOP_K, guarded,
                      repetition_args(params.extra_args))

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        """PAD's scores in place for the PAD rows (V1: row = batch index; V2: row ->
        request slot through ``ctx.idx_mapping_np``)."""
        rows = self.active_rows(logits.shape[0], ctx)
        if rows:
            apply_pad(logits, rows)
        return logits


def apply_pad(logits: torch.Tensor, rows: list[ActiveRow[PadRow]]) -> None:
    """Replace the PAD rows of ``logits`` with PAD's scores, in place."""
    from padlm.vllm.model import active_model

    model = active_model()
    if model.padlm_hidden is None or model.padlm_hidden.shape[0] != logits.shape[0]:
        raise PadlmError("PAD on vLLM needs the hidden state of every logits row (no "
                         "speculative decoding or batch-sharded sampling)")
    device = logits.device
    settings = [row.settings for row in rows]
    index = torch.tensor([row.index for row in rows], device=device)
    base = logits[index]
    guarded = [None if s.guarded is None else s.guarded.to(device) for s in settings]

    def echo(candidates: torch.Tensor) -> torch.Tensor | None:
        if all(g is None for g in guarded):
            return None
        return guidance.echo_candidates(candidates, guarded)

    logits[index] = guidance.guided_step(
        controlled(base, rows, [s.repetition for s in settings]),
        torch.tensor([s.top_k for s in settings], device=device),
        torch.tensor([s.weight for s in settings], device=device, dtype=base.dtype),
        lambda candidates, valid: guidance.pad_token_reward(
            base.gather(1, candidates), model.reward_logits(index, candidates), valid),
        echo)
