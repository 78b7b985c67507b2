"""padlm's decode-batch interface on a vLLM engine, so ``padlm serve --engine vllm`` keeps
padlm's server (admission, limits, streaming, cancellation, drain, metrics) unchanged.

The server's worker drives one batch per strategy: it joins requests, steps, and drops rows
whose client left. Here every strategy's batch is a view on one vLLM ``LLMEngine``, which
batches all of them together (continuously, on its own scheduler): a :class:`VllmRouter` adds
and aborts requests and hands each batch the outputs of its own rows. vLLM chooses the tokens
(PAD through padlm's logits processor); what the tokens *mean* (end-of-sequence, stop strings,
the length limit, the streamed text) is decided by :class:`padlm.core.decoding.RowText`, the same
code as on padlm's own loop, so the responses and their deltas match token for token.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from padlm.core.decoding import Request, Row, RowText, StepEvent

if TYPE_CHECKING:
    from padlm.vllm.engine import VllmPersonalizer


class VllmRouter:
    """One vLLM engine under several batches: request ids in, each batch's outputs out."""

    def __init__(self, llm_engine) -> None:
        self.llm_engine = llm_engine
        self._owner: dict[str, VllmBatch] = {}
        self._outputs: dict[int, list] = {}  # id(batch) -> outputs not yet taken
        self._ids = itertools.count()

    def add(self, batch: VllmBatch, prompt_ids: list[int], params) -> str:
        request_id = f"padlm-{next(self._ids)}"
        self.llm_engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
        self._owner[request_id] = batch
        return request_id

    def abort(self, request_ids: Sequence[str]) -> None:
        live = [rid for rid in request_ids if self._owner.pop(rid, None) is not None]
        if live:
            self.llm_engine.abort_request(live)

    def outputs(self, batch: VllmBatch) -> list:
        """The batch's outputs since it last asked; steps the engine when there are none (one
        engine step serves every batch, so the others find theirs waiting)."""
        if not self._outputs.get(id(batch)) and self._owner:
            for output in self.llm_engine.step():
                owner = self._owner.get(output.request_id)
                if owner is None:
                    continue  # aborted after it was scheduled
                self._outputs.setdefault(id(owner), []).append(output)
                if output.finished:
                    del self._owner[output.request_id]
        return self._outputs.pop(id(batch), [])


class VllmBatch(RowText):
    """The rows of one strategy on the shared engine, with the interface of
    :class:`padlm.core.decoding.DecodeBatch` that the server's worker uses."""

    streams: tuple = ()  # no KV state on this side: vLLM holds it
    prefilling: tuple = ()  # vLLM prefills long prompts in chunks on its own scheduler
    waiting_rows: tuple = ()

    def __init__(self, engine: VllmPersonalizer, router: VllmRouter, strategy: str) -> None:
        self.engine, self.router, self.strategy = engine, router, strategy
        self.tokenizer = engine.tokenizer
        self.eos_ids = set(engine.eos_ids)
        self.rows: list[Row] = []
        self.finished: list[Row] = []
        self._request_id: dict[int, str] = {}  # id(row) -> vLLM request id
        self._row: dict[str, Row] = {}

    def join(self, requests: Sequence[Request], chunk_tokens: int | None = None) -> list[Row]:
        """Check every request first (a refusal adds none of them), then hand them to vLLM
        (``chunk_tokens`` is vLLM's own business: its scheduler chunks long prefills)."""
        prepared = []
        for request in requests:
            prompt_ids = self.engine.planned_ids(request, self.strategy)
            prepared.append((Row(request, [[prompt_ids]], None), prompt_ids,
                             self.engine.sampling_params(request, self.strategy, stream=True)))
        for row, prompt_ids, params in prepared:
            request_id = self.router.add(self, prompt_ids, params)
            self._request_id[id(row)], self._row[request_id] = request_id, row
            self.rows.append(row)
        return [row for row, _, _ in prepared]

    def prefill(self, budget: int) -> int:
        """Nothing waits here: every row joined vLLM's scheduler at :meth:`join`."""
        return 0

    def run(self, requests: Sequence[Request]) -> list[Row]:
        """Join ``requests`` and step until every row has finished; rows in request order."""
        rows = self.join(requests)
        while self.rows:
            self.step()
        return rows

    def leave(self, rows: Sequence[Row]) -> None:
        gone = {id(row) for row in rows}
        self.router.abort([self._forget(row) for row in self.rows if id(row) in gone])
        self.rows = [row for row in self.rows if id(row) not in gone]

    def _forget(self, row: Row) -> str:
        request_id = self._request_id.pop(id(row))
        self._row.pop(request_id, None)
        return request_id

    def step(self) -> list[StepEvent]:
        """The tokens vLLM chose since the last step, as padlm's events. A row that padlm's
        rules end (a stop string) is aborted in vLLM; one that vLLM ends is ended here too."""
        events: list[StepEvent] = []
        done: list[Row] = []
        for output in self.router.outputs(self):
            row = self._row.get(output.request_id)
            if row is None:
                continue
            completion = output.outputs[0]
            event = None
            for token in completion.token_ids:
                event = self._advance(row, token)
                events.append(event)
                if event.finished:
                    break
            if event is None or not event.finished:
                if not output.finished:
                    continue
                events.append(self._ended_by_vllm(row, completion.finish_reason,
                                                  events.pop() if event else None))
            done.append(row)
        ended = {id(row) for row in done}
        self.router.abort([self._forget(row) for row in done])
        self.rows = [row for row in self.rows if id(row) not in ended]
        self.finished.extend(done)
        return events

    def _ended_by_vllm(self, row: Row, reason: str | None, last: StepEvent | None
                       ) -> StepEvent:
        """vLLM ended a row by a rule padlm does not apply: the row ends with its text so far,
        on its last token's event (or an end-of-sequence event, which appends nothing)."""
        row.finish_reason = reason or "length"
        delta = self._flush(row)
        if last is not None:
            return StepEvent(row, last.token, last.delta + delta, True)
        return StepEvent(row, min(self.eos_ids), delta, True)

    def probe(self, indices: Sequence[int]) -> None:
        """Nothing to probe row by row: a failed vLLM step fails the whole batch (the
        worker then resets it, aborting its requests)."""
