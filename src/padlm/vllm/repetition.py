"""padlm's repetition control as a vLLM logits processor, so both engines mean the same thing.

vLLM's own ``repetition_penalty`` counts the prompt's tokens too and has no no-repeat-ngram
rule; padlm's HF loop penalises and bans on the *response* tokens only (the answer may still
quote the question) and does so before PAD chooses its candidates. This processor applies
:func:`padlm.core.guidance.repetition_control` to the plain rows that ask for it; PAD rows are
left to the PAD processor, which needs the raw logits for its reward and the controlled ones
for its candidates, as on the HF engine.

Per request: ``SamplingParams.extra_args={"padlm_no_repeat_ngram_size": 3,
"padlm_repetition_penalty": 1.2}`` (the same flat keys work as HTTP ``vllm_xargs``).

Both model runners through :class:`padlm.vllm.rows.TrackedRowsProcessor` (V2 written for,
not run here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from padlm.core import guidance
from padlm.vllm.requests import RepetitionArgs, pad_args, repetition_args
from padlm.vllm.rows import ActiveRow, TrackedRowsProcessor

if TYPE_CHECKING:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext


def controlled(logits: torch.Tensor, rows: list[ActiveRow], args: list[RepetitionArgs | None]
               ) -> torch.Tensor:
    """``logits`` (one row per active row) after each row's repetition control."""
    if not any(args):
        return logits
    plain = RepetitionArgs()
    return guidance.repetition_control(
        logits, [row.output for row in rows],
        [(a or plain).repetition_penalty for a in args],
        [(a or plain).no_repeat_ngram_size for a in args])


class RepetitionLogitsProcessor(TrackedRowsProcessor[RepetitionArgs]):
    """Response-only repetition penalty and no-repeat-ngram ban for the plain rows that ask."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        repetition_args(sampling_params.extra_args)

    def settings_of(self, params: SamplingParams) -> RepetitionArgs | None:
        if pad_args(params.extra_args) is not None:
            return None  # the PAD processor controls its own rows
        return repetition_args(params.extra_args)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        rows = self.active_rows(logits.shape[0], ctx)
        if rows:
            index = torch.tensor([row.index for row in rows], device=logits.device)
            logits[index] = controlled(logits[index], rows, [row.settings for row in rows])
        return logits
