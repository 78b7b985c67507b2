"""The one lock-step decode loop every token-level strategy runs through.

A strategy turns the last-position outputs of its KV streams into next-token scores; the
decode batch owns those streams (models with their caches). The loop does the rest,
identically for every strategy: repetition control, greedy or sampled choice, appending the
SAME token to every stream, per-row stop on EOS / stop strings / length, and streaming text
out. Rows may join and leave between steps (the server's continuous batching uses exactly
this loop).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from padlm.core import guidance
from padlm.core.config import GenerationConfig
from padlm.core.kvstream import KVStream, Prefill, StreamOutput
from padlm.core.preferences import Preference
from padlm.core.prompting import Message
from padlm.core.registry import StrategySpec, check_request


@dataclass(frozen=True)
class Rendered:
    """A request's contexts (per stream, per lane: token ids) as a planner already rendered
    them with an engine's strategy of that name, so that engine's batch of that strategy
    does not render them again (the server's planner thread renders, the decode thread
    only decodes)."""

    strategy: str
    contexts: list[list[list[int]]]


@dataclass
class Request:
    """What a user asks for: a prompt (text or chat messages), a preference, settings."""

    prompt: str | Sequence[Message]
    preference: Preference = Preference()
    config: GenerationConfig = field(default_factory=GenerationConfig)
    rendered: Rendered | None = None  # set by padlm.core.planning.plan

    def planned_for(self, strategy: str) -> bool:
        """Whether a planner checked and rendered this request for rows of ``strategy``."""
        return self.rendered is not None and self.rendered.strategy == strategy


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
    trace: list = field(default_factory=list)  # per-step data a strategy chooses to record
    # the strategy's typed reading of the row's settings (``Strategy.admit``), parsed once
    # when the row joins instead of at every step
    state: Any = None
    # incremental detokenization: ``text`` holds tokens[:read] decoded; decoding restarts at
    # ``prefix`` so a token's leading space or a multi-byte character comes out right
    prefix: int = 0
    read: int = 0

    @property
    def config(self) -> GenerationConfig:
        return self.request.config


class Rows(list):
    """A batch's live rows, with per-row parameter columns built once per membership change
    (not at every step) on the device of the logits they meet."""

    def __init__(self, rows=()) -> None:
        super().__init__(rows)
        self._columns: dict[tuple, torch.Tensor] = {}

    def column(self, name: str, default: float, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        """``[rows]`` tensor of ``config.<name>``, ``default`` where a row leaves it unset."""
        key = (name, default, str(device))
        if key not in self._columns:
            values = [getattr(row.config, name) for row in self]
            self._columns[key] = torch.tensor(
                [default if value is None else value for value in values], device=device)
        return self._columns[key]


class Strategy(Protocol):
    """How a method turns model outputs into next-token scores (see padlm.core.strategies).

    A strategy whose rows carry settings it must parse (experts, mixing weights) may also
    define ``admit(request) -> state``: called once as the row joins, its result is
    ``row.state``, which ``scores`` reads at every step."""

    spec: StrategySpec

    def new_streams(self) -> list[KVStream]: ...

    def contexts(self, request: Request) -> list[list[list[int]]]: ...

    def scores(
        self, outputs: list[StreamOutput], rows: Rows,
        process: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor: ...


@dataclass
class StepEvent:
    """One generated token of one row; ``delta`` is the new text it made visible."""

    row: Row
    token: int
    delta: str
    finished: bool


class RowText:
    """A row's text from its tokens, whoever chose them: end-of-sequence, stop strings, the
    length limit, incremental detokenization and the streamed deltas (which hold back what
    may still become a stop string). padlm's decode loop and its vLLM batch share it, so both
    engines end and stream a response identically. Needs ``tokenizer`` and ``eos_ids``."""

    tokenizer: Any
    eos_ids: set[int]

    def _advance(self, row: Row, token: int) -> StepEvent:
        config = row.config
        if token in self.eos_ids and not config.ignore_eos:
            row.finish_reason = "stop"
            return StepEvent(row, token, self._flush(row), True)
        row.tokens.append(token)
        grown = self._detokenize(row)
        for stop in config.stop:
            # a new match can only start within the last len(stop) - 1 old characters
            at = row.text.find(stop, max(0, len(row.text) - grown - len(stop) + 1))
            if at >= 0:
                row.text = row.text[:at]
                row.finish_reason = "stop"
                return StepEvent(row, token, self._flush(row, tail=False), True)
        if len(row.tokens) >= config.max_new_tokens:
            row.finish_reason = "length"
            return StepEvent(row, token, self._flush(row), True)
        visible = len(row.text) - _held_back(row.text, config.stop)
        delta = row.text[row.emitted:visible]
        row.emitted = max(row.emitted, visible)
        return StepEvent(row, token, delta, False)

    def _detokenize(self, row: Row) -> int:
        """Extend ``row.text`` by the characters the newest token completes, decoding only a
        short window instead of the whole response (linear, not quadratic, in its length);
        returns how many characters were added. An incomplete multi-byte character waits
        for the token that completes it."""
        added = self._undecoded_text(row)
        if not added or added.endswith("\ufffd"):
            return 0
        row.text += added
        row.prefix, row.read = row.read, len(row.tokens)
        return len(added)

    def _undecoded_text(self, row: Row) -> str:
        """The text of ``tokens[read:]``, decoded in the window that starts at ``prefix``."""
        decode = self.tokenizer.decode
        before = decode(row.tokens[row.prefix:row.read], skip_special_tokens=True)
        after = decode(row.tokens[row.prefix:], skip_special_tokens=True)
        return after[len(before):]

    def _flush(self, row: Row, tail: bool = True) -> str:
        """A finishing row's last delta. With ``tail``, tokens still undecoded (an incomplete
        character at EOS or the length limit) are rendered as the tokenizer renders them;
        a stop string's cut drops them instead (they come after it)."""
        if tail and row.read < len(row.tokens):
            row.text += self._undecoded_text(row)
            row.prefix = row.read = len(row.tokens)
        delta = row.text[row.emitted:]
        row.emitted = len(row.text)
        return delta


class DecodeBatch(RowText):
    """Rows decoding together under one strategy; rows join and leave between steps.

    The batch owns its KV streams (the strategy only says how to score), so any number of
    batches from one engine run side by side."""

    def __init__(self, strategy: Strategy, tokenizer, eos_ids: Sequence[int]) -> None:
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.streams = strategy.new_streams()
        self.rows = Rows()
        self.finished: list[Row] = []
        self._pending: list[StreamOutput] | None = None  # outputs not yet turned into tokens
        self.last_outputs: list[StreamOutput] | None = None  # what the last step scored
        self.prefilling: list[PrefillGroup] = []  # rows joining a chunk at a time, oldest first

    @property
    def device(self) -> torch.device:
        return self.streams[0].device

    @torch.inference_mode()
    def join(self, requests: Sequence[Request], chunk_tokens: int | None = None) -> list[Row]:
        """Prefill new requests (one batched forward per stream) and add them to the batch.

        With ``chunk_tokens``, requests whose prefill is longer than that many positions wait
        in :attr:`prefilling` instead, and :meth:`prefill` runs them a chunk at a time between
        steps; they take part in steps once their last chunk has run."""
        new_rows = self._new_rows(requests)
        if not new_rows:
            return []
        group = PrefillGroup(new_rows, [
            stream.prefill([lane for row in new_rows for lane in row.contexts[s]])
            for s, stream in enumerate(self.streams)])
        if chunk_tokens is not None and group.tokens_left > chunk_tokens:
            self.prefilling.append(group)
        else:
            self._joined(group, [prefill.advance(None) for prefill in group.streams])
        return new_rows

    @torch.inference_mode()
    def prefill(self, budget: int) -> int:
        """Run about ``budget`` positions of waiting prefills, oldest first (one chunk of
        one stream at least); returns how many rows joined the batch."""
        joined = 0
        while self.prefilling and budget > 0:
            group = self.prefilling[0]
            prefill = next(p for p in group.streams if p.tokens_left)
            before = prefill.tokens_left
            out = prefill.advance(budget)
            budget -= before - prefill.tokens_left
            if out is not None:
                group.outputs.append(out)
            if len(group.outputs) == len(group.streams):
                self.prefilling.pop(0)
                self._joined(group, group.outputs)
                joined += len(group.rows)
        return joined

    def _joined(self, group: PrefillGroup, outputs: list[StreamOutput]) -> None:
        for prefill in group.streams:
            prefill.merge()
        self._pending = outputs if self._pending is None else [
            _concat(old, new) for old, new in zip(self._pending, outputs, strict=True)
        ]
        self.rows = Rows([*self.rows, *group.rows])

    def _new_rows(self, requests: Sequence[Request]) -> list[Row]:
        new_rows = []
        name = self.strategy.spec.name
        for request in requests:
            planned = request.planned_for(name)
            if not planned:  # a planned request was checked by padlm.core.planning.plan
                check_request(name, request.config)
            generator = None
            if request.config.temperature > 0:
                generator = torch.Generator(device=self.device)
                # no seed: a fresh one, leaving torch's global generator alone
                generator.manual_seed(request.config.seed if request.config.seed is not None
                                      else secrets.randbits(63))
            admit = getattr(self.strategy, "admit", None)
            contexts = request.rendered.contexts if planned else self.strategy.contexts(request)
            new_rows.append(Row(request, contexts, generator,
                                state=admit(request) if admit else None))
        return new_rows

    @property
    def waiting_rows(self) -> list[Row]:
        """Rows still prefilling."""
        return [row for group in self.prefilling for row in group.rows]

    def run(self, requests: Sequence[Request]) -> list[Row]:
        """Join ``requests`` and step until every row has finished; rows in request order."""
        self.join(requests)
        while self.rows:
            self.step()
        finished = {id(row.request): row for row in self.finished}
        return [finished[id(request)] for request in requests]

    def leave(self, rows: Sequence[Row]) -> None:
        """Remove rows (finished, or their client went away) before the next step; a row
        still prefilling stops there."""
        gone = {id(row) for row in rows}
        for group in list(self.prefilling):
            group.keep([i for i, row in enumerate(group.rows) if id(row) not in gone])
            if not group.rows:
                self.prefilling.remove(group)
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        for stream in self.streams:
            stream.keep(keep)
        if self._pending is not None:
            self._pending = [_select(out, keep) for out in self._pending]
        self.rows = Rows([self.rows[i] for i in keep])

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Choose one token for every row, append it to every stream, report what changed.

        If scoring or choosing fails (a bad row, a numeric blow-up), the batch is left exactly
        as it was, generators included, so the caller may drop the culprit and step again."""
        if not self.rows:
            return []
        # 1-2. scores from the strategy (repetition control applied to its proposal logits),
        # then greedy or sampled choice, each row with its own settings and generator
        tokens = self._choose(self._pending, self.rows, restore_on_error=True).tolist()
        self.last_outputs = self._pending
        # 3. bookkeeping: text, stop conditions, streaming deltas
        events = [self._advance(row, token) for row, token in zip(self.rows, tokens,
                                                                  strict=True)]
        # 4. finished rows leave; the rest get the chosen token in every stream (lock-step)
        done = [event.row for event in events if event.finished]
        self.finished.extend(done)
        self.leave(done)
        if self.rows:
            live = torch.tensor([row.tokens[-1] for row in self.rows], device=self.device)
            self._pending = [stream.step(live) for stream in self.streams]
        return events

    @torch.inference_mode()
    def probe(self, indices: Sequence[int]) -> torch.Tensor:
        """The tokens the next step would choose for the rows at ``indices``, computed on
        their own and changing nothing (generators run on copies): raises what the real step
        would raise for them, so a server can find the row that breaks a step."""
        rows = Rows([self.rows[i] for i in indices])
        outputs = [_select(out, list(indices)) for out in self._pending]
        return self._choose(outputs, rows, generators=[_copy(row.generator) for row in rows])

    def _choose(self, outputs: list[StreamOutput], rows: Rows, restore_on_error: bool = False,
                generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        generators = [row.generator for row in rows] if generators is None else generators
        saved = ([(g, g.get_state()) for g in generators if g is not None]
                 if restore_on_error else [])
        try:
            scores = self.strategy.scores(outputs, rows, lambda z: _repetition_control(z, rows))
            return guidance.choose_tokens(
                scores, rows.column("temperature", 0.0, scores.device),
                rows.column("top_p", 1.0, scores.device), generators)
        except Exception:
            for generator, state in saved:  # a row may have drawn before another failed
                generator.set_state(state)
            raise


@dataclass
class PrefillGroup:
    """Rows that joined together and prefill together, one :class:`Prefill` per stream."""

    rows: list[Row]
    streams: list[Prefill]
    outputs: list[StreamOutput] = field(default_factory=list)  # of the streams done

    @property
    def tokens_left(self) -> int:
        return sum(prefill.tokens_left for prefill in self.streams)

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if self.rows:
            for prefill in self.streams:
                prefill.keep(indices)
            self.outputs = [_select(out, indices) for out in self.outputs]


def _repetition_control(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The same for every strategy, on the response tokens only (so the answer may still
    quote the question)."""
    return guidance.repetition_control(
        logits, [row.tokens for row in rows],
        [row.config.repetition_penalty for row in rows],
        [row.config.no_repeat_ngram_size for row in rows])


def _copy(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None:
        return None
    return torch.Generator(device=generator.device).set_state(generator.get_state())


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters to withhold from a stream: a suffix that might be the start of a stop
    string (incomplete UTF-8 characters never reach ``text`` before they complete)."""
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                held = max(held, length)
                break
    return held


def _concat(old: StreamOutput, new: StreamOutput) -> StreamOutput:
    logits = None if old.logits is None else torch.cat([old.logits, new.logits])
    return StreamOutput(logits, torch.cat([old.hidden, new.hidden]))


def _select(out: StreamOutput, keep: Sequence[int]) -> StreamOutput:
    index = torch.tensor(keep, dtype=torch.long)
    return StreamOutput(None if out.logits is None else out.logits[index], out.hidden[index])
