"""The one request planner: the CLI, the evaluation and the data samplers (through an engine's
``generate`` and ``stream``) and the server's planner thread all make a request ready to
decode here, so it is checked once and rendered once, whoever asked; and how a request
becomes decode rows and back (:class:`Expansion`), so best-of-n is a wrapper around ordinary
rows that no caller branches on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from padlm.core.decoding import Rendered, Request, Row
from padlm.core.registry import strategy_class

if TYPE_CHECKING:
    from padlm.engines import Engine


@dataclass(frozen=True)
class Expansion:
    """How each request of one strategy becomes rows of the token-level strategy ``rows``,
    and how the finished rows become its answer. Without a ``picker``: one row per request,
    kept as it is. With one (best-of-n): ``n`` seeded sample rows per request, which decode
    beside anyone else's rows of ``rows``, and the picker's sequence scorer keeps one."""

    rows: str
    n: int = 1
    picker: object | None = None  # pick_many(rows, n) and sample_requests(request, n)

    def expand(self, request: Request) -> list[Request]:
        """The rows that stand for ``request`` (the picker refuses what it cannot score)."""
        return self.picker.sample_requests(request, self.n) if self.picker else [request]

    def pick(self, rows: Sequence[Row]) -> list[tuple[Row, float | None]]:
        """Each request's answer from its finished rows (in expansion order), with the
        picker's score where there is one."""
        if self.picker is None:
            return [(row, None) for row in rows]
        return self.picker.pick_many(rows, self.n)


def expansion(engine: Engine, strategy: str, n: int = 1) -> Expansion:
    """The :class:`Expansion` of ``strategy``: a sequence-level strategy (best-of-n) samples
    ``n`` rows of the strategy it wraps; every token-level one decodes its own rows."""
    if strategy_class(strategy).spec.level == "sequence":
        picker = engine.strategy(strategy)
        return Expansion(picker.sampler, n, picker)
    return Expansion(strategy)


def plan(engine: Engine, strategy: str, request: Request) -> Request:
    """``request`` ready to decode with ``strategy`` on ``engine``: its settings checked
    against the strategy and the engine (``engine.check``: before any decoding starts) and
    every context of every lane rendered once (``Request.rendered``), so a decode batch
    neither re-checks nor re-renders it. Raises :class:`~padlm.errors.PadlmError` for what
    the strategy cannot serve (an unknown expert, free text a scorer cannot score)."""
    engine.check(strategy, request.config)
    rows = expansion(engine, strategy).rows  # best-of-n renders for its sampler's rows
    return replace(request, rendered=Rendered(rows, engine.contexts(rows, request)))
