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
:mod:`padlm.guidance`'s, as on the HF engine. Other rows are untouched.

Order against vLLM's own stages: V1 applies it before penalties, V2 after them (so a request
combining vLLM's repetition penalty with PAD differs between the runners and from padlm's HF
engine, which penalises the base logits before choosing candidates); temperature, top-p and
min-p come after it in both, as on the HF engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from padlm import guidance
from padlm.errors import PadlmError
from padlm.vllm.requests import ARCHITECTURES, pad_args

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


class PadLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """PAD for the rows that ask for it (see the module docstring for the two runners)."""

    def __init__(self, vllm_config: VllmConfig, *runner_args: Any) -> None:
        # V1 passes (device, is_pin_memory), V2 (req_states): neither is needed
        from padlm.vllm.model import persrm_dir

        padlm_architectures = set(ARCHITECTURES.values())
        if not padlm_architectures & set(vllm_config.model_config.architectures):
            raise PadlmError("padlm's PAD logits processor needs a padlm architecture: start "
                             f"vLLM with hf_overrides {{\"architectures\": [one of "
                             f"{', '.join(sorted(padlm_architectures))}]}}")
        if persrm_dir(vllm_config) is None:
            raise PadlmError("padlm's PAD logits processor needs a PersRM: start vLLM with "
                             'additional_config={"padlm": {"persrm": DIR}}')
        self.vllm_config = vllm_config
        self.rows: dict[int, PadRow] = {}  # V1: batch index; V2: request slot

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the frontend at admission: a bad setting is an HTTP 400, not a crash."""
        pad_args(sampling_params.extra_args)

    @cached_property
    def _tokenizer(self):
        """Loaded on the first echo-guarded request: the guard's ids are token ids of the
        preference's words."""
        from transformers import AutoTokenizer

        config = self.vllm_config.model_config
        return AutoTokenizer.from_pretrained(config.tokenizer,
                                             trust_remote_code=config.trust_remote_code)

    def _row(self, params: SamplingParams) -> PadRow | None:
        args = pad_args(params.extra_args)
        if args is None:
            return None
        from padlm.prompting import preference_token_ids
        from padlm.strategies import DEFAULT_TOP_K
        from padlm.vllm.model import active_model

        saved = active_model().padlm_persrm.config
        guarded = None
        if args.echo_guard:
            guarded = torch.tensor(preference_token_ids(self._tokenizer, args.preference),
                                   dtype=torch.long)
        return PadRow(saved.recommended_weight if args.weight is None else args.weight,
                      args.top_k or saved.top_k or DEFAULT_TOP_K, guarded)

    def _set(self, key: int, params: SamplingParams) -> bool:
        row = self._row(params)
        if row is None:
            self.rows.pop(key, None)
        else:
            self.rows[key] = row
        return row is not None

    # --- V1 interface -------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy choice: vLLM must apply it to greedy rows too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removals, then additions, then moves (V1's order)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            self._set(index, params)
        for source, target, direction in batch_update.moved:
            moving, displaced = self.rows.pop(source, None), self.rows.pop(target, None)
            if moving is not None:
                self.rows[target] = moving
            if direction == MoveDirectionality.SWAP and displaced is not None:
                self.rows[source] = displaced

    # --- V2 interface -------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return self._set(req_idx, sampling_params)

    # --- both ---------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        """PAD's scores in place for the PAD rows (V1: row = batch index; V2: row ->
        request slot through ``ctx.idx_mapping_np``)."""
        if not self.rows:
            return logits
        if ctx is None:
            picked = sorted(self.rows)
            settings = [self.rows[index] for index in picked]
        else:
            slots = ctx.idx_mapping_np.tolist()
            if len(slots) != logits.shape[0]:
                raise PadlmError("PAD on vLLM needs one logits row per request (no "
                                 "speculative decoding)")
            picked = [row for row, slot in enumerate(slots) if slot in self.rows]
            settings = [self.rows[slots[row]] for row in picked]
        if picked:
            apply_pad(logits, picked, settings)
        return logits


def apply_pad(logits: torch.Tensor, picked: list[int], settings: list[PadRow]) -> None:
    """Replace the ``picked`` rows of ``logits`` with PAD's scores, in place."""
    from padlm.vllm.model import active_model

    model = active_model()
    if model.padlm_hidden is None or model.padlm_hidden.shape[0] != logits.shape[0]:
        raise PadlmError("PAD on vLLM needs the hidden state of every logits row (no "
                         "speculative decoding or batch-sharded sampling)")
    device = logits.device
    rows = torch.tensor(picked, device=device)
    base = logits[rows]
    k = torch.tensor([row.top_k for row in settings], device=device)
    candidates, valid = guidance.top_k_candidates(base, k)
    echo = None
    if any(row.guarded is not None for row in settings):
        echo = guidance.echo_candidates(candidates, [
            None if row.guarded is None else row.guarded.to(device) for row in settings])
    scores = guidance.pad_scores(
        base.gather(1, candidates), model.reward_logits(rows, candidates),
        torch.tensor([row.weight for row in settings], device=device, dtype=base.dtype),
        valid, echo=echo)
    logits[rows] = guidance.scatter_to_vocab(candidates, scores, logits.shape[-1])
