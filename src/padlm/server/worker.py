"""The decode worker: one thread owns the models and one ``DecodeBatch`` per strategy.

Requests from many users join the running batch between steps (continuous batching); each
row carries its own preference, weight, top-k, temperature and seed in its
``GenerationConfig``, so users with different settings share one forward per step. The thread
loops: admit waiting jobs whose rows fit next to the live ones, drop rows whose request ended
(client gone, failed, past its deadline), run one ``step()`` per non-empty batch, and hand every
row's new text to its request's sink.

All model work happens on this one thread (the streams and the forward hooks that read hidden
states are per call, so two threads must never run the shared models at once). Best-of-n is
no exception and no obstacle: its samples are ordinary rows of the sampler's batch, decoded
step by step beside everyone else's, and only the scorer's one forward runs at the end.

Isolation: whatever goes wrong in one request's path (prefill, a step, the scorer, token
rewards) fails that request alone with a 500; a failed step is probed row by row (bisection,
without touching the batch) to find the rows that caused it, only their requests fail, and the
others step on. Every job ends with exactly one final message (``JobDone`` or ``JobFailed``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from padlm.core.decoding import DecodeBatch, Request, Row
from padlm.core.planning import Expansion
from padlm.engines import Engine
from padlm.errors import PadlmError
from padlm.server.rewards import TokenRewards
from padlm.server.schemas import ApiError
from padlm.server.settings import ServerSettings

log = logging.getLogger(__name__)

RATE_SMOOTHING = 0.2  # weight of the newest iteration in the tokens/s estimate
MAX_RETRY_AFTER_S = 60


@dataclass
class TokenEvent:
    """New output of one choice: its text delta and, at the end, why it stopped."""

    index: int
    delta: str
    token: int | None = None  # None: nothing was appended (an end-of-sequence token)
    piece: str | None = None  # the token's own text (only when rewards were asked for)
    reward: float | None = None
    mix_weights: dict[str, float] | None = None  # this token's expert weights (mix)
    finish_reason: str | None = None
    text: str | None = None  # the full final text, on the finishing event
    trace: list | None = None  # every token's expert weights, on the finishing event
    completion_tokens: int = 0


@dataclass
class JobDone:
    """Every choice of the job has finished."""


@dataclass
class JobFailed:
    error: ApiError


@dataclass
class Job:
    """One API request. ``rows`` decode in the token-level strategy ``expansion.rows``: one
    row per choice, or for best-of-n ``expansion.n`` consecutive sample rows per choice of
    which ``expansion.pick`` keeps one. Events go to ``sink`` (called on the worker
    thread)."""

    rows: list[Request]
    expansion: Expansion  # the batch its rows decode in, and how they become its choices
    sink: Callable[[list], None]
    token_rewards: bool = False
    prefill_tokens: int = 0  # prompt tokens over all rows, lanes and streams
    stream: bool = True  # False: only the finishing event of each choice is sent
    timeout_s: float = math.inf
    cancelled: bool = False  # the client went away (set by BatchWorker.cancel)
    closed: bool = False  # the worker sent the final message
    submitted: float = field(default_factory=time.monotonic)
    overtaken: int = 0  # smaller jobs admitted ahead of it while it did not fit
    finished: list[Row | None] = field(default_factory=list)
    remaining: int = 0  # rows still in a batch
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        """Tokens this job reads and may generate: what it weighs in the queue (a 4k-token
        prompt with ``max_tokens: 1`` is not a one-token job)."""
        return self.prefill_tokens + sum(request.config.max_new_tokens for request in self.rows)

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout_s

    @property
    def ended(self) -> bool:
        return self.cancelled or self.closed

    def send(self, items: Sequence) -> None:
        if not self.cancelled:
            self.sink(list(items))


class WorkerObserver(Protocol):
    """What the decode thread reports as it works, for whoever keeps count
    (:class:`~padlm.server.metrics.ServerMetrics`): the worker measures, the observer records,
    so the decode loop knows nothing of Prometheus. Every call comes from the decode thread,
    between steps: an observer must be thread-safe and quick."""

    def waited(self, seconds: float) -> None:
        """A job was admitted after waiting this long for rows."""

    def first_token(self, seconds: float) -> None:
        """A job's first token came out this long after it was submitted."""

    def next_token(self, seconds: float) -> None:
        """A choice's next token came out this long after its previous one."""

    def generated(self, tokens: int) -> None:
        """One step generated this many tokens (best-of-n samples included)."""

    def job_done(self, finish_reasons: Sequence[str], seconds: float) -> None:
        """A job ended normally, ``seconds`` after it was submitted; one reason per choice."""


def admissible(waiting: Sequence[Job], free: int, max_overtakes: int) -> list[Job]:
    """The waiting jobs to start now, oldest first, while their rows fit in ``free``.

    A job that does not fit is skipped, so a small request never waits behind a large one
    (no head-of-line blocking); each job that starts ahead of it counts as overtaking it, and
    once it has been overtaken ``max_overtakes`` times nothing behind it starts until it does
    (rows drain, it fits): a large request waits for at most that many smaller ones.
    """
    taken: list[Job] = []
    passed: list[Job] = []
    for job in waiting:
        if len(job.rows) <= free:
            taken.append(job)
            free -= len(job.rows)
            for other in passed:
                other.overtaken += 1
        else:
            passed.append(job)
            if job.overtaken >= max_overtakes:
                break
    return taken


def find_culprits(probe: Callable[[list[int]], None], indices: list[int]) -> list[int]:
    """The rows whose probe fails on its own, by bisection: ``O(k log n)`` probes for ``k``
    culprits among ``n`` rows. Empty when only a combination fails."""
    try:
        probe(indices)
        return []
    except Exception:
        if len(indices) == 1:
            return indices
    middle = len(indices) // 2
    return find_culprits(probe, indices[:middle]) + find_culprits(probe, indices[middle:])


class BatchWorker:
    """Owns the decode batches. ``submit``, ``cancel`` and ``drain`` are called from other
    threads; everything else runs on the worker's thread."""

    def __init__(self, engine: Engine, settings: ServerSettings | None = None,
                 observer: WorkerObserver | None = None) -> None:
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.max_batch_size = self.settings.max_batch_size
        self.max_overtakes = self.max_batch_size  # see admissible()
        self.observer = observer
        self.batches: dict[str, DecodeBatch] = {}
        self._owners: dict[int, tuple[Job, int]] = {}  # id(row) -> (job, row slot)
        self._running: dict[int, Job] = {}
        self._waiting: list[Job] = []
        self._queued_tokens = 0
        self._wake = threading.Condition()
        self._stopped = False
        self._draining = False
        self._drain_deadline = math.inf
        self._drained = threading.Event()
        self._rate = 0.0  # tokens/s, smoothed: how fast the queue empties
        self.fatal: str | None = None  # set when the thread died
        self.stats = {"steps": 0, "rows_finished": 0, "rows_cancelled": 0, "jobs_failed": 0,
                      "jobs_done": 0, "max_live_rows": 0, "steps_recovered": 0}
        self._thread = threading.Thread(target=self._run, name="padlm-decode", daemon=True)

    @cached_property
    def _rewards(self) -> TokenRewards:
        """Built on the first request that asks (the server refuses such requests on an
        engine whose PersRM runs out of reach)."""
        return TokenRewards(self.engine.persrm,
                            self.engine.lm.model.get_output_embeddings().weight)

    # ---- called from other threads -------------------------------------------------------
    def start(self) -> BatchWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def submit(self, job: Job) -> None:
        """Queue a job; a 503 while draining or broken, a 429 (with ``Retry-After``) when
        ``max_queue`` jobs or ``max_queue_tokens`` tokens are already waiting."""
        with self._wake:
            if not self.alive:
                raise ApiError(503, "the decode worker has stopped; the server needs a restart",
                               kind="server_error", code="worker_stopped")
            if self._draining or self._stopped:
                raise ApiError(503, "the server is shutting down", kind="server_error",
                               code="server_shutting_down",
                               headers={"Retry-After": str(math.ceil(
                                   self.settings.drain_timeout_s))})
            limit = self.settings
            if len(self._waiting) >= limit.max_queue or (
                    self._waiting and self._queued_tokens + job.cost > limit.max_queue_tokens):
                raise ApiError(429, f"server busy: {len(self._waiting)} requests "
                               f"({self._queued_tokens} tokens) are waiting; retry later",
                               code="rate_limit_exceeded", kind="rate_limit_error",
                               headers={"Retry-After": str(self._retry_after())})
            self._waiting.append(job)
            self._queued_tokens += job.cost
            self._wake.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a running job's rows
        leave the batch at the next step."""
        with self._wake:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._queued_tokens -= job.cost
            self._wake.notify_all()

    def drain(self) -> bool:
        """Stop admitting (waiting jobs get a 503 now), let running rows finish for up to
        ``drain_timeout_s``, then end the rest with a 503. True when every job ended."""
        error = ApiError(503, "the server is shutting down", kind="server_error",
                         code="server_shutting_down")
        with self._wake:
            self._draining = True
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            for job in self._waiting:
                self._fail(job, error)
            self._waiting.clear()
            self._queued_tokens = 0
            self._wake.notify_all()
        return self._drained.wait(self.settings.drain_timeout_s + 10) or not self.alive

    @property
    def live_rows(self) -> int:
        return sum(len(batch.rows) + len(batch.waiting_rows)
                   for batch in list(self.batches.values()))

    @property
    def status(self) -> str:
        if not self.alive:
            return "worker-dead"
        return "draining" if self._draining else "ok"

    def snapshot(self) -> dict:
        return {"live_rows": self.live_rows, "waiting": len(self._waiting),
                "queued_tokens": self._queued_tokens, "running": len(self._running),
                "max_batch_size": self.max_batch_size, "max_queue": self.settings.max_queue,
                "batches": {name: len(b.rows) for name, b in list(self.batches.items())},
                "alive": self.alive, **self.stats}

    def _retry_after(self) -> int:
        """Seconds until the queued tokens are likely decoded, at the measured rate."""
        if self._rate <= 0:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._queued_tokens / self._rate)))

    # ---- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iteration():
                pass
        except BaseException as error:  # a bug outside every job's path: say so, end all
            self.fatal = f"{type(error).__name__}: {error}"
            log.critical("the decode worker stopped", exc_info=True)
            self._end_all(ApiError(500, "the decode worker stopped; the server needs a "
                                   "restart", kind="server_error", code="worker_stopped"))
        finally:
            self._drained.set()

    def _iteration(self) -> bool:
        with self._wake:
            while not (self._stopped or self._waiting or self._running
                       or (self._draining and not self._drained.is_set())):
                self._wake.wait()
            if self._stopped:
                self._end_all(ApiError(503, "the server is shutting down",
                                       kind="server_error", code="server_shutting_down"))
                return False
            admitted = self._take_admissible(time.monotonic())
        began, tokens = time.perf_counter(), 0
        self._expire(time.monotonic())
        self._admit(admitted)
        for name, batch in list(self.batches.items()):
            if batch.prefilling:
                self._prefill(name, batch)
        self._expire(time.monotonic())  # a prefill chunk may have taken a job past its deadline
        self._drop_ended()
        for name, batch in list(self.batches.items()):
            if batch.rows:
                tokens += self._step(name, batch)
        if tokens:
            rate = tokens / max(time.perf_counter() - began, 1e-6)
            self._rate = rate if self._rate == 0 else (
                RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * self._rate)
        if self._draining:
            self._check_drain()
        return True

    def _take_admissible(self, now: float) -> list[Job]:
        """Under the lock: expire waiting jobs past their deadline, then take those
        :func:`admissible` picks; they count as running from here on."""
        expired = ApiError(504, f"the request waited longer than the server's "
                           f"{self.settings.request_timeout_s:g} s deadline",
                           kind="server_error", code="request_timeout")
        for job in [job for job in self._waiting if now > job.deadline]:
            self._waiting.remove(job)
            self._queued_tokens -= job.cost
            self._fail(job, expired)
        taken = admissible(self._waiting, self.max_batch_size - self.live_rows,
                           self.max_overtakes)
        for job in taken:
            self._waiting.remove(job)
            self._queued_tokens -= job.cost
            self._running[id(job)] = job
        return taken

    def _check_drain(self) -> None:
        if self._running and time.monotonic() > self._drain_deadline:
            error = ApiError(503, "the server is shutting down: the request did not finish "
                             f"within the {self.settings.drain_timeout_s:g} s drain timeout",
                             kind="server_error", code="server_shutting_down")
            for job in list(self._running.values()):
                self._fail(job, error)
            self._drop_ended()
        if not self._running:
            self._drained.set()

    def _expire(self, now: float) -> None:
        for job in list(self._running.values()):
            if now > job.deadline:
                self._fail(job, ApiError(504, "the request did not finish within the "
                                         f"server's {self.settings.request_timeout_s:g} s "
                                         "deadline", kind="server_error",
                                         code="request_timeout"))

    def _admit(self, jobs: list[Job]) -> None:
        groups: dict[str, list[Job]] = {}
        now = time.monotonic()
        for job in jobs:
            if self.observer:
                self.observer.waited(now - job.submitted)
            job.finished = [None] * len(job.rows)
            groups.setdefault(job.expansion.rows, []).append(job)
        chunk = self.settings.prefill_chunk_tokens
        for name, group in groups.items():
            group = [job for job in group if not job.ended]
            # short prompts prefill together now, in one forward (a burst of them is at most
            # max_batch_size x chunk positions); each long one joins on its own, a chunk per
            # iteration, so its prefill neither delays nor shares a failure with others
            self._join(name, [job for job in group if job.prefill_tokens <= chunk])
            for job in group:
                if job.prefill_tokens > chunk:
                    self._join(name, [job], chunk)
        self._forget_ended()
        self.stats["max_live_rows"] = max(self.stats["max_live_rows"], self.live_rows)

    def _join(self, name: str, group: list[Job], chunk_tokens: int | None = None) -> None:
        """One batched prefill for the newcomers; if it fails, each job again on its own, so
        only the request that breaks the prefill fails."""
        if not group:
            return
        try:
            batch = self.batches.get(name) or self.batches.setdefault(
                name, self.engine.batch(name))
        except Exception as error:
            for job in group:
                self._fail(job, _job_error(error, "preparing the strategy"))
            return
        before = _shape(batch)
        try:
            rows = batch.join([request for job in group for request in job.rows],
                              chunk_tokens=chunk_tokens)
        except Exception as error:
            intact = _shape(batch) == before
            if len(group) > 1 and intact:
                for job in group:
                    self._join(name, [job], chunk_tokens)
                return
            log.warning("prefill of %d request(s) on %s failed: %s", len(group), name, error)
            for job in group:
                self._fail(job, _job_error(error, "reading the prompt"))
            if not intact:
                self._reset(name, error)
            return
        owners = [(job, slot) for job in group for slot in range(len(job.rows))]
        for row, (job, slot) in zip(rows, owners, strict=True):
            self._owners[id(row)] = (job, slot)
        for job in group:
            job.remaining = len(job.rows)

    def _prefill(self, name: str, batch: DecodeBatch) -> None:
        """One chunk of the batch's waiting prefills. A failed chunk fails the requests of
        the rows it was for (their cache is their own: the batch is untouched)."""
        group = batch.prefilling[0]
        try:
            batch.prefill(self.settings.prefill_chunk_tokens)
        except Exception as error:
            log.warning("a prefill chunk on %s failed: %s", name, error)
            for row in group.rows:
                self._fail(self._owners[id(row)][0], _job_error(error, "reading the prompt"))
            self._drop_ended()

    def _drop_ended(self) -> None:
        """Rows of jobs that ended (client gone, failed, expired) leave their batch, from a
        step or from the middle of their prefill."""
        for batch in self.batches.values():
            gone = [row for row in [*batch.rows, *batch.waiting_rows]
                    if self._owners[id(row)][0].ended]
            if not gone:
                continue
            # counted before the rows leave: whoever sees them gone (a metrics scrape, a
            # test on another thread) also sees them counted
            for row in gone:
                job, _ = self._owners.pop(id(row))
                job.remaining -= 1
                if job.cancelled:
                    self.stats["rows_cancelled"] += 1
            batch.leave(gone)
        self._forget_ended()

    def _forget_ended(self) -> None:
        for key, job in list(self._running.items()):
            if job.ended and job.remaining == 0:
                del self._running[key]

    def _step(self, name: str, batch: DecodeBatch) -> int:
        """One step of one batch; returns how many tokens it generated."""
        rows = list(batch.rows)
        before = _shape(batch)
        try:
            events = batch.step()  # a failed scoring/choice leaves the batch as it was
        except Exception as error:
            self._recover(name, batch, before, error)
            return 0  # the survivors step at the next iteration, unchanged
        self._deliver(batch, rows, events)
        return len(events)

    def _recover(self, name: str, batch: DecodeBatch, before: tuple,
                 error: Exception) -> None:
        """A step failed: find the rows that make it fail and fail only their requests. If
        the step changed the batch before failing, or no row fails alone, the batch's state
        cannot be trusted: its requests fail and the strategy starts a fresh batch."""
        log.warning("a step of %s with %d rows failed (%s: %s); probing its rows", name,
                    len(batch.rows), type(error).__name__, error)
        culprits: list[int] = []
        if _shape(batch) == before:
            culprits = find_culprits(batch.probe,
                                     list(range(len(batch.rows))))
        if not culprits:
            self._reset(name, error)
            return
        self.stats["steps_recovered"] += 1
        for index in culprits:
            self._fail(self._owners[id(batch.rows[index])][0],
                       _job_error(error, "decoding this request"))
        self._drop_ended()

    def _deliver(self, batch: DecodeBatch, rows: list[Row], events: list) -> None:
        self.stats["steps"] += 1
        now = time.monotonic()
        rewards = self._token_rewards(batch, rows, events)
        outgoing: dict[int, tuple[Job, list]] = {}
        for i, event in enumerate(events):
            job, slot = self._owners[id(event.row)]
            self._observe_token(job, slot, now)
            if job.expansion.picker is not None or not (job.stream or event.finished):
                continue
            appended = event.token not in batch.eos_ids or event.row.config.ignore_eos
            item = TokenEvent(slot, event.delta, event.token if appended else None)
            if job.token_rewards and appended:
                item.piece = batch.tokenizer.decode([event.token])
                item.reward = None if rewards is None else rewards[i]
            if appended and event.row.trace:
                item.mix_weights = event.row.trace[-1]
            if event.finished:
                item.finish_reason = event.row.finish_reason
                item.text = event.row.text
                item.trace = event.row.trace or None
                item.completion_tokens = len(event.row.tokens)
            outgoing.setdefault(id(job), (job, []))[1].append(item)
        complete: list[Job] = []
        for row in batch.finished:
            job, slot = self._owners.pop(id(row))
            job.finished[slot] = row
            job.remaining -= 1
            self.stats["rows_finished"] += 1
            if job.remaining == 0 and not job.ended:
                complete.append(job)
        batch.finished.clear()
        for job, items in outgoing.values():
            if not job.ended:
                job.send(items)
        for job in complete:
            self._complete(job)
        self._forget_ended()
        if self.observer:
            self.observer.generated(len(events))

    def _token_rewards(self, batch: DecodeBatch, rows: list[Row], events: list
                       ) -> list[float] | None:
        wanting = {id(job): job for job, _ in (self._owners[id(row)] for row in rows)
                   if job.token_rewards}
        if not wanting:
            return None
        try:
            return self._rewards(batch, rows, [event.token for event in events])
        except Exception as error:  # only the requests that asked for rewards pay
            log.exception("token rewards failed")
            for job in wanting.values():
                self._fail(job, _job_error(error, "computing token rewards"))
            return None

    def _observe_token(self, job: Job, slot: int, now: float) -> None:
        if self.observer is None:
            return
        if job.first_token is None:
            job.first_token = now
            self.observer.first_token(now - job.submitted)
        elif slot in job.last_token:
            self.observer.next_token(now - job.last_token[slot])
        job.last_token[slot] = now

    def _complete(self, job: Job) -> None:
        """Every row finished: best-of-n picks one sample per choice, then the job ends."""
        items: list = []
        if job.expansion.picker is not None:
            try:
                picked = job.expansion.pick(job.finished)
            except Exception as error:
                log.exception("the best-of-n scorer failed")
                self._fail(job, _job_error(error, "scoring the samples"))
                return
            items = [TokenEvent(i, row.text, finish_reason=row.finish_reason, text=row.text,
                                completion_tokens=len(row.tokens))
                     for i, (row, _) in enumerate(picked)]
            chosen = [row for row, _ in picked]
        else:
            chosen = job.finished
        self._close(job, [*items, JobDone()])
        self.stats["jobs_done"] += 1
        if self.observer:
            self.observer.job_done([row.finish_reason or "length" for row in chosen],
                                   time.monotonic() - job.submitted)

    def _close(self, job: Job, items: list) -> None:
        """Send a job's final message, once."""
        if job.closed:
            return
        job.send(items)
        job.closed = True

    def _fail(self, job: Job, error: ApiError) -> None:
        if not job.closed:
            self.stats["jobs_failed"] += 1
        self._close(job, [JobFailed(error)])

    def _reset(self, name: str, error: Exception) -> None:
        """Fail every request of a batch whose state cannot be trusted; the strategy gets a
        fresh batch on its next request."""
        log.error("resetting the %s batch after %s: %s", name, type(error).__name__, error)
        batch = self.batches.pop(name, None)
        if batch is None:
            return
        rows = [*batch.rows, *batch.waiting_rows, *batch.finished]
        with contextlib.suppress(Exception):  # an engine of its own (vLLM) frees the rows
            batch.leave([*batch.rows, *batch.waiting_rows])
        for row in rows:
            owner = self._owners.pop(id(row), None)
            if owner is not None:
                self._fail(owner[0], _job_error(error, "decoding"))
                owner[0].remaining -= 1
        self._forget_ended()

    def _end_all(self, error: ApiError) -> None:
        with self._wake:
            jobs = [*self._waiting, *self._running.values()]
            self._waiting.clear()
            self._queued_tokens = 0
        for job in jobs:
            self._fail(job, error)
        self._running.clear()
        self._owners.clear()
        self.batches.clear()


def _shape(batch: DecodeBatch) -> tuple:
    """What a step or a prefill changes: the rows, their lengths, the finished rows and the
    streams' sizes. Unchanged after an exception means the batch is as it was."""
    return (tuple(id(row) for row in batch.rows), tuple(len(row.tokens) for row in batch.rows),
            len(batch.finished), tuple(stream.rows for stream in batch.streams),
            tuple(id(row) for row in batch.waiting_rows))


def _job_error(error: Exception, doing: str) -> ApiError:
    """A request's own failure: a 400 for padlm's refusals, else a 500 naming the error
    kind (never its text, which may hold server paths or tensor contents)."""
    if isinstance(error, PadlmError):
        return ApiError(400, str(error), error.param)
    return ApiError(500, f"internal error while {doing} ({type(error).__name__})",
                    kind="server_error", code="internal_error")
