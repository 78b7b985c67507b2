"""The decode worker: one thread owns the models and one ``DecodeBatch`` per strategy.

Requests from many users join the running batch between steps (continuous batching); each
row carries its own preference, weight, top-k, temperature and seed in its
``GenerationConfig``, so users with different settings share one forward per step. The thread
loops: admit waiting jobs while live rows stay within ``max_batch_size``, drop rows whose
client went away, run one ``step()`` per non-empty batch, and hand every row's new text to its
request's asyncio queue on the event loop (``call_soon_threadsafe``).

All model work happens on this one thread: the decode loop's streams are stateful and the
forward hooks that read hidden states are per-call, so two threads must never run the shared
models at once (best-of-n therefore runs here too, between steps).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from padlm.decoding import DecodeBatch, Request
from padlm.engine import Personalizer
from padlm.errors import PadlmError
from padlm.server.rewards import RecordingStrategy, TokenRewards
from padlm.server.schemas import ApiError

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """New output of one choice: its text delta and, at the end, why it stopped."""

    index: int
    delta: str
    token: int | None = None  # None: nothing was appended (an end-of-sequence token)
    piece: str | None = None  # the token's own text (only when rewards were asked for)
    reward: float | None = None
    finish_reason: str | None = None
    text: str | None = None  # the full final text, on the finishing event
    completion_tokens: int = 0


@dataclass
class JobDone:
    """Every choice of the job has finished."""


@dataclass
class JobFailed:
    error: ApiError


@dataclass
class Job:
    """One API request: ``requests[i]`` decodes choice ``i``; events go to ``queue``."""

    requests: list[Request]
    strategy: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    token_rewards: bool = False
    stream: bool = True  # False: only the finishing event of each choice is sent
    best_of: int = 4  # samples per choice for the best-of-n strategy
    cancelled: bool = False
    remaining: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def rows_needed(self) -> int:
        return 0 if self.strategy == "best-of-n" else len(self.requests)

    def cancel(self) -> None:
        """Called from the event loop when the client goes away; the worker frees the rows
        at its next step (a plain attribute write: atomic under the GIL)."""
        self.cancelled = True

    def send(self, items: Sequence) -> None:
        """Thread-safe hand-off to the request's coroutine."""
        if self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, list(items))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True


class BatchWorker:
    """Owns the decode batches; ``submit`` from any thread, everything else on its thread."""

    def __init__(self, engine: Personalizer, max_batch_size: int = 16,
                 max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise PadlmError("--max-batch-size must be >= 1 and the queue size >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batches: dict[str, DecodeBatch] = {}
        self._owners: dict[int, tuple[Job, int]] = {}  # id(row) -> (job, choice index)
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._rewards = TokenRewards(engine.persrm,
                                     engine.lm.model.get_output_embeddings().weight)
        self.stats = {"steps": 0, "rows_finished": 0, "rows_cancelled": 0, "jobs_failed": 0,
                      "jobs_done": 0, "max_live_rows": 0}
        self._thread = threading.Thread(target=self._run, name="padlm-decode", daemon=True)

    # ---- called from other threads -------------------------------------------------------
    def start(self) -> BatchWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse with a 429 when ``max_queue`` jobs are already waiting."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise ApiError(429, f"server busy: {len(self._waiting)} requests are waiting; "
                               "retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error")
            self._waiting.append(job)
            self._wake.notify_all()

    @property
    def live_rows(self) -> int:
        return sum(len(batch.rows) for batch in list(self.batches.values()))

    def snapshot(self) -> dict:
        return {"live_rows": self.live_rows, "waiting": len(self._waiting),
                "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                "batches": {name: len(b.rows) for name, b in list(self.batches.items())},
                "alive": self._thread.is_alive(), **self.stats}

    # ---- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self.live_rows:
                    self._wake.wait()
                if self._stopped:
                    self._shutdown()
                    break
                admitted = self._take_admissible()
            try:
                self._admit(admitted)
                self._drop_cancelled()
                for name, batch in list(self.batches.items()):
                    if batch.rows:
                        self._step(name, batch)
            except Exception:  # never let one bad step kill the server
                log.exception("decode worker error; resetting every batch")
                for name in list(self.batches):
                    self._fail_batch(name, ApiError(500, "internal error while decoding",
                                                    kind="server_error"))

    def _shutdown(self) -> None:
        """Tell every client still waiting that the server is going away."""
        error = ApiError(503, "the server is shutting down", kind="server_error")
        jobs = {id(job): job for job, _ in self._owners.values()}
        jobs.update({id(job): job for job in self._waiting})
        for job in jobs.values():
            job.send([JobFailed(error)])
            job.cancel()
        self._owners.clear()
        self._waiting.clear()

    def _take_admissible(self) -> list[Job]:
        """FIFO: take waiting jobs while their rows fit next to the live ones."""
        taken, rows = [], self.live_rows
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if rows and rows + job.rows_needed > self.max_batch_size:
                break
            taken.append(self._waiting.popleft())
            rows += job.rows_needed
        return taken

    def _batch(self, name: str) -> DecodeBatch:
        """A batch with its own strategy object (its own KV streams), wrapped to record the
        outputs for token rewards; a clone engine shares the loaded models."""
        if name not in self.batches:
            engine = self.engine
            clone = Personalizer(engine.lm, persrm=engine.persrm, placement=engine.placement,
                                 scorer=engine.scorer)
            self.batches[name] = DecodeBatch(RecordingStrategy(clone.strategy(name)),
                                             clone.lm.tokenizer, clone.eos_ids)
        return self.batches[name]

    def _admit(self, jobs: list[Job]) -> None:
        by_strategy: dict[str, list[Job]] = {}
        for job in jobs:
            if job.strategy == "best-of-n":
                self._best_of_n(job)
            else:
                by_strategy.setdefault(job.strategy, []).append(job)
        for name, group in by_strategy.items():
            batch = self._batch(name)
            requests = [request for job in group for request in job.requests]
            try:
                rows = batch.join(requests)  # one batched prefill for all newcomers
            except PadlmError as error:
                for job in group:
                    self._fail(job, ApiError(400, str(error)))
                continue
            except Exception:
                log.exception("prefill failed")
                for job in group:
                    self._fail(job, ApiError(500, "internal error while reading the prompt",
                                             kind="server_error"))
                self._fail_batch(name, ApiError(500, "internal error", kind="server_error"))
                continue
            owners = [(job, i) for job in group for i in range(len(job.requests))]
            for row, (job, index) in zip(rows, owners, strict=True):
                self._owners[id(row)] = (job, index)
            for job in group:
                job.remaining = len(job.requests)
        self.stats["max_live_rows"] = max(self.stats["max_live_rows"], self.live_rows)

    def _best_of_n(self, job: Job) -> None:
        """Blocking, between steps: best-of-n decodes its own batch of samples."""
        try:
            for index, request in enumerate(job.requests):
                if job.cancelled:
                    return
                result = self.engine.best_of_n(request.prompt, request.preference,
                                               request.config, job.best_of)
                job.send([TokenEvent(index, result.text, finish_reason=result.finish_reason,
                                     text=result.text, completion_tokens=result.new_tokens)])
        except PadlmError as error:
            self._fail(job, ApiError(400, str(error)))
            return
        job.send([JobDone()])
        self.stats["jobs_done"] += 1

    def _drop_cancelled(self) -> None:
        for batch in self.batches.values():
            gone = [row for row in batch.rows if self._owners[id(row)][0].cancelled]
            if gone:
                batch.leave(gone)
                for row in gone:
                    del self._owners[id(row)]
                self.stats["rows_cancelled"] += len(gone)

    def _step(self, name: str, batch: DecodeBatch) -> None:
        rows = list(batch.rows)
        events = batch.step()
        self.stats["steps"] += 1
        want_rewards = any(self._owners[id(row)][0].token_rewards for row in rows)
        rewards = (self._rewards(batch.strategy, rows, [e.token for e in events])
                   if want_rewards else None)
        outgoing: dict[int, tuple[Job, list]] = {}
        for i, event in enumerate(events):
            job, index = self._owners[id(event.row)]
            if not (job.stream or event.finished):
                continue
            appended = event.token not in batch.eos_ids or event.row.config.ignore_eos
            item = TokenEvent(index, event.delta, event.token if appended else None)
            if job.token_rewards and appended:
                item.piece = batch.tokenizer.decode([event.token])
                item.reward = None if rewards is None else rewards[i]
            if event.finished:
                item.finish_reason = event.row.finish_reason
                item.text = event.row.text
                item.completion_tokens = len(event.row.tokens)
            outgoing.setdefault(id(job), (job, []))[1].append(item)
        for row in batch.finished:
            job, _ = self._owners.pop(id(row))
            job.remaining -= 1
            self.stats["rows_finished"] += 1
            if job.remaining == 0:
                outgoing.setdefault(id(job), (job, []))[1].append(JobDone())
                self.stats["jobs_done"] += 1
        batch.finished.clear()
        for job, items in outgoing.values():
            job.send(items)

    def _fail(self, job: Job, error: ApiError) -> None:
        self.stats["jobs_failed"] += 1
        job.send([JobFailed(error)])
        job.cancel()

    def _fail_batch(self, name: str, error: ApiError) -> None:
        """Fail every job in a batch and start that strategy afresh (its KV state may be
        inconsistent after an exception)."""
        batch = self.batches.pop(name, None)
        if batch is None:
            return
        jobs = {id(job): job for job, _ in (self._owners.pop(id(row)) for row in batch.rows)}
        for job in jobs.values():
            self._fail(job, error)
        for row in batch.finished:
            self._owners.pop(id(row), None)
