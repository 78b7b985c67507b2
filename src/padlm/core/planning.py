"""The one request planner: the CLI, the evaluation and the data samplers (through an engine's
``generate`` and ``stream``) and the server's planner thread all make a request ready to
decode here, so it is checked once and rendered once, whoever asked."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from padlm.core.decoding import Rendered, Request
from padlm.core.registry import strategy_class

if TYPE_CHECKING:
    from padlm.engines import Engine


def rows_strategy(engine: Engine, strategy: str) -> str:
    """The token-level strategy whose rows decode ``strategy``: itself, or for a
    sequence-level one (best-of-n) the strategy it samples with."""
    if strategy_class(strategy).spec.level == "sequence":
        return engine.strategy(strategy).sampler
    return strategy


def plan(engine: Engine, strategy: str, request: Request) -> Request:
    """``request`` ready to decode with ``strategy`` on ``engine``: its settings checked
    against the strategy and the engine (``engine.check``: before any decoding starts) and
    every context of every lane rendered once (``Request.rendered``), so a decode batch
    neither re-checks nor re-renders it. Raises :class:`~padlm.errors.PadlmError` for what
    the strategy cannot serve (an unknown expert, free text a scorer cannot score)."""
    engine.check(strategy, request.config)
    rows = rows_strategy(engine, strategy)
    return replace(request, rendered=Rendered(rows, engine.contexts(rows, request)))
