"""Which rows of vLLM's batch a padlm logits processor acts on, under both model runners.

V1 (this CPU build) hands a processor batch moves (``update_state``: removals, additions, moves)
with a live reference to each request's output tokens; Model Runner V2 (vLLM's default on GPUs)
hands it request slots (``add_request``) and, per step, the slot of every logits row
(``LogitsContext``), with the committed tokens in the runner's per-slot buffer. One base class
follows both, so each processor only says what a request asks of it and what to do per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from padlm.errors import PadlmError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

Settings = TypeVar("Settings")


@dataclass
class _Tracked(Generic[Settings]):
    settings: Settings
    output: Sequence[int] | None  # V1: vLLM's live list of the response's tokens


@dataclass(frozen=True)
class ActiveRow(Generic[Settings]):
    """A logits row this processor acts on in this step."""

    index: int  # row of the logits tensor
    settings: Settings
    output: list[int]  # the response's tokens so far


class TrackedRowsProcessor(V1LogitsProcessor, V2LogitsProcessor, Generic[Settings]):
    """Keeps, per request that asks for it (:meth:`settings_of` not None), its settings and a
    way to read its response so far; :meth:`active_rows` lists them for one step."""

    def __init__(self, vllm_config: VllmConfig, *runner_args: Any) -> None:
        # V1 passes (device, is_pin_memory); V2 (req_states), whose token buffer it reads
        self.vllm_config = vllm_config
        self.req_states = runner_args[0] if len(runner_args) == 1 else None
        self.rows: dict[int, _Tracked[Settings]] = {}  # V1: batch index; V2: request slot

    def settings_of(self, params: SamplingParams) -> Settings | None:
        raise NotImplementedError

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy choice: vLLM must apply it to greedy rows too

    def _set(self, key: int, params: SamplingParams, output: Sequence[int] | None) -> bool:
        settings = self.settings_of(params)
        if settings is None:
            self.rows.pop(key, None)
        else:
            self.rows[key] = _Tracked(settings, output)
        return settings is not None

    # --- V1 ----------------------------------------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removals, then additions, then moves (V1's order)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            self._set(index, params, output)
        for source, target, direction in batch_update.moved:
            moving, displaced = self.rows.pop(source, None), self.rows.pop(target, None)
            if moving is not None:
                self.rows[target] = moving
            if direction == MoveDirectionality.SWAP and displaced is not None:
                self.rows[source] = displaced

    # --- V2 ----------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return self._set(req_idx, sampling_params, None)

    def _v2_output(self, slot: int, row: int, ctx: LogitsContext) -> list[int]:
        """The response so far: committed tokens after the prompt, then this step's input
        token (the last one sampled, which may not be committed yet)."""
        prompt_len = int(self.req_states.prompt_len.np[slot])
        position = int(ctx.pos[row])
        if position < prompt_len:
            return []  # the step right after prefill: nothing generated yet
        committed = self.req_states.all_token_ids.gpu[slot, prompt_len:position].tolist()
        return [*committed, int(ctx.input_ids[row])]

    # --- both --------------------------------------------------------------------------

    def active_rows(self, logits_rows: int, ctx: LogitsContext | None) -> list[ActiveRow]:
        """This step's rows that asked for this processor, in logits-row order."""
        if not self.rows:
            return []
        if ctx is None:  # V1: row = batch index
            return [ActiveRow(index, tracked.settings, list(tracked.output or ()))
                    for index, tracked in sorted(self.rows.items())]
        slots = ctx.idx_mapping_np.tolist()
        if len(slots) != logits_rows:
            raise PadlmError("padlm's logits processors need one logits row per request (no "
                             "speculative decoding)")
        return [ActiveRow(row, self.rows[slot].settings, self._v2_output(slot, row, ctx))
                for row, slot in enumerate(slots) if slot in self.rows]
