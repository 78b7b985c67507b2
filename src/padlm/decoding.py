"""The one lock-step decode loop every token-level strategy runs through.

A strategy owns one or more KV streams (models with their caches) and turns their last-position
outputs into next-token scores. The loop does the rest, identically for every strategy:
repetition control, greedy or sampled choice, appending the SAME token to every stream,
per-row stop on EOS / stop strings / length, and streaming text out. Rows may join and leave
between steps (the server's continuous batching uses exactly this loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from padlm import guidance
from padlm.errors import PadlmError
from padlm.kvstream import KVStream, StreamOutput
from padlm.prompting import Message


@dataclass(frozen=True)
class GenerationConfig:
    """Per-request decoding settings; ``weight``/``top_k`` are the strategy's knobs."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    weight: float | None = None
    top_k: int | None = None  # None: the strategy's default (PersRM config, else 10)
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    # no guidance bonus for the preference's own words (they echo it); see ECHO_GUARDED
    echo_guard: bool = False

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise PadlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k is not None and self.top_k < 1:
            raise PadlmError(f"top-k must be >= 1, got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise PadlmError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PadlmError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.weight is not None and not math.isfinite(self.weight):
            raise PadlmError(f"weight must be a finite number, got {self.weight}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise PadlmError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise PadlmError("no-repeat-ngram size must be >= 0")
        return self


@dataclass
class Request:
    """What a user asks for: a prompt (text or chat messages), a preference, settings."""

    prompt: str | Sequence[Message]
    preference: str = ""
    config: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class Row:
    """A request being decoded: its contexts, what it generated, and whether it is done."""

    request: Request
    contexts: list[list[list[int]]]  # per stream, per lane: the prompt token ids
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed out
    finish_reason: str | None = None

    @property
    def config(self) -> GenerationConfig:
        return self.request.config


# the strategies whose guidance has a per-token bonus the echo guard can cap
ECHO_GUARDED = ("pad", "linear-alignment")


def echo_guard_refusal(strategy: str) -> str:
    """Why ``strategy`` cannot take the echo guard: one wording for the decode loop, the CLI
    and the server (the last two refuse before any model work)."""
    return (f"the echo guard caps a per-token guidance bonus: {' and '.join(ECHO_GUARDED)} "
            f"have one, {strategy} does not")


class Strategy(Protocol):
    """How a method turns model outputs into next-token scores."""

    name: str
    streams: list[KVStream]

    def contexts(self, request: Request) -> list[list[list[int]]]: ...

    def scores(
        self, outputs: list[StreamOutput], rows: Sequence[Row],
        process: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor: ...


@dataclass
class StepEvent:
    """One generated token of one row; ``delta`` is the new text it made visible."""

    row: Row
    token: int
    delta: str
    finished: bool


class DecodeBatch:
    """Rows decoding together under one strategy; rows join and leave between steps."""

    def __init__(self, strategy: Strategy, tokenizer, eos_ids: Sequence[int]) -> None:
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.rows: list[Row] = []
        self.finished: list[Row] = []
        self._pending: list[StreamOutput] | None = None  # outputs not yet turned into tokens

    @torch.inference_mode()
    def join(self, requests: Sequence[Request]) -> list[Row]:
        """Prefill new requests (one batched forward per stream) and add them to the batch."""
        new_rows = []
        for request in requests:
            request.config.validate()
            if request.config.echo_guard and self.strategy.name not in ECHO_GUARDED:
                raise PadlmError(echo_guard_refusal(self.strategy.name))
            generator = None
            if request.config.temperature > 0:
                generator = torch.Generator()
                generator.manual_seed(request.config.seed if request.config.seed is not None
                                      else torch.seed())
            new_rows.append(Row(request, self.strategy.contexts(request), generator))
        outputs = [
            stream.join([lane for row in new_rows for lane in row.contexts[s]])
            for s, stream in enumerate(self.strategy.streams)
        ]
        self._pending = outputs if self._pending is None else [
            _concat(old, new) for old, new in zip(self._pending, outputs, strict=True)
        ]
        self.rows.extend(new_rows)
        return new_rows

    def run(self, requests: Sequence[Request]) -> list[Row]:
        """Join ``requests`` and step until every row has finished; rows in request order."""
        self.join(requests)
        while self.rows:
            self.step()
        finished = {id(row.request): row for row in self.finished}
        return [finished[id(request)] for request in requests]

    def leave(self, rows: Sequence[Row]) -> None:
        """Remove rows (finished, or their client went away) before the next step."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        for stream in self.strategy.streams:
            stream.keep(keep)
        if self._pending is not None:
            self._pending = [_select(out, keep) for out in self._pending]
        self.rows = [self.rows[i] for i in keep]

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Choose one token for every row, append it to every stream, report what changed."""
        if not self.rows:
            return []
        # 1. scores from the strategy, repetition control applied to its proposal logits
        scores = self.strategy.scores(self._pending, self.rows, self._process)
        # 2. greedy or sampled choice, each row with its own settings and generator
        tokens = guidance.choose_tokens(
            scores,
            torch.tensor([row.config.temperature for row in self.rows]),
            torch.tensor([row.config.top_p for row in self.rows]),
            [row.generator for row in self.rows],
        )
        # 3. bookkeeping: text, stop conditions, streaming deltas
        events = [self._advance(row, int(token)) for row, token in zip(self.rows, tokens,
                                                                       strict=True)]
        # 4. finished rows leave; the rest get the chosen token in every stream (lock-step)
        done = [event.row for event in events if event.finished]
        self.finished.extend(done)
        self.leave(done)
        if self.rows:
            live = torch.tensor([row.tokens[-1] for row in self.rows])
            self._pending = [stream.step(live) for stream in self.strategy.streams]
        return events

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        """Repetition control, the same for every strategy, on the response tokens only
        (so the answer may still quote the question)."""
        previous = [row.tokens for row in self.rows]
        penalties = torch.tensor([row.config.repetition_penalty for row in self.rows])
        if (penalties != 1.0).any():
            logits = guidance.apply_repetition_penalty(logits, previous, penalties)
        sizes = [row.config.no_repeat_ngram_size for row in self.rows]
        if any(sizes):
            logits = guidance.apply_no_repeat_ngram(logits, previous, sizes)
        return logits

    def _advance(self, row: Row, token: int) -> StepEvent:
        config = row.config
        if token in self.eos_ids and not config.ignore_eos:
            row.finish_reason = "stop"
            return StepEvent(row, token, self._flush(row), True)
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for stop in config.stop:
            at = row.text.find(stop)
            if at >= 0:
                row.text = row.text[:at]
                row.finish_reason = "stop"
                return StepEvent(row, token, self._flush(row), True)
        if len(row.tokens) >= config.max_new_tokens:
            row.finish_reason = "length"
            return StepEvent(row, token, self._flush(row), True)
        visible = len(row.text) - _held_back(row.text, config.stop)
        delta = row.text[row.emitted:visible]
        row.emitted = max(row.emitted, visible)
        return StepEvent(row, token, delta, False)

    @staticmethod
    def _flush(row: Row) -> str:
        delta = row.text[row.emitted:]
        row.emitted = len(row.text)
        return delta


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters to withhold from a stream: an incomplete UTF-8 character, or a suffix
    that might be the start of a stop string."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                held = max(held, length)
                break
    return held


def _concat(old: StreamOutput, new: StreamOutput) -> StreamOutput:
    return StreamOutput(torch.cat([old.logits, new.logits]), torch.cat([old.hidden, new.hidden]))


def _select(out: StreamOutput, keep: Sequence[int]) -> StreamOutput:
    index = torch.tensor(keep, dtype=torch.long)
    return StreamOutput(out.logits[index], out.hidden[index])
