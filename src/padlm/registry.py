"""The strategy registry: what each method is and needs, in one table everyone reads.

Torch-free on purpose: the registry's types and lookups cost nothing to import. The classes
themselves register when :mod:`padlm.strategies` (and :mod:`padlm.orchestration`) import;
:func:`load_registry` makes sure they have.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from padlm.config import GenerationConfig
from padlm.errors import PadlmError

# the two contexts a lane can hold: the prompt with the preference placed in it, or without
PREFERENCE, NEUTRAL = "preference", "neutral"


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is and needs, read by the engine, CLI, server, harness and report."""

    name: str
    summary: str
    uses_persrm: bool = False  # reads the PersRM (as its reward or head)
    uses_scorer: bool = False  # scores with the engine's sequence scorer (--scorer)
    uses_experts: bool = False  # reads the orchestration experts
    echo_guard: bool = False  # has a per-token guidance bonus the echo guard can cap
    level: str = "token"  # "token": the decode loop; "sequence": whole responses, then a pick
    weighted: bool = False  # takes GenerationConfig.weight
    lane: str = PREFERENCE  # the context its proposal logits come from (base: NEUTRAL)


REGISTRY: dict[str, type] = {}
# the sequence scorers ARGS and best-of-n take (``--scorer``): the per-dimension reward models
# (the default: independent of the PersRM) or the PersRM's own implicit reward
SCORERS = ("dimensions", "persrm")
DEFAULT_SCORER = "dimensions"
STRATEGY_MODULES = ("padlm.strategies", "padlm.orchestration.strategies")


def register(cls: type) -> type:
    """Class decorator: the one line that makes a strategy exist everywhere."""
    REGISTRY[cls.spec.name] = cls
    return cls


def strategy_class(name: str) -> type:
    load_registry()
    if name not in REGISTRY:
        raise PadlmError(f"unknown strategy {name!r}; choose one of {', '.join(REGISTRY)}",
                         param="strategy")
    return REGISTRY[name]


def strategy_names(**wanted: object) -> tuple[str, ...]:
    """Registered names whose spec matches every ``field=value`` given, in registry order."""
    load_registry()
    return tuple(name for name, cls in REGISTRY.items()
                 if all(getattr(cls.spec, key) == value for key, value in wanted.items()))


def echo_guard_refusal(strategy: str) -> str:
    """Why ``strategy`` cannot take the echo guard: one wording for every caller."""
    guarded = strategy_names(echo_guard=True)
    return (f"the echo guard caps a per-token guidance bonus: {' and '.join(guarded)} "
            f"have one, {strategy} does not")


def check_request(name: str, config: GenerationConfig) -> None:
    """Refusals that depend on the strategy, made before any model work."""
    if config.echo_guard and not strategy_class(name).spec.echo_guard:
        raise PadlmError(echo_guard_refusal(name), param="echo_guard")
    if config.reference is not None and not strategy_class(name).spec.uses_persrm:
        raise PadlmError(f"a reward reference applies to the PersRM strategies "
                         f"({', '.join(strategy_names(uses_persrm=True))}), not {name!r}",
                         param="reference")
    if config.mix is not None and not strategy_class(name).spec.uses_experts:
        raise PadlmError(f"mixing weights apply to the expert strategies "
                         f"({', '.join(strategy_names(uses_experts=True))}), not {name!r}",
                         param="mix")


def check_scorer(name: str) -> None:
    """Refuse an unknown scorer name before any model loads."""
    if name not in SCORERS:
        raise PadlmError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}",
                         param="scorer")


def load_registry() -> dict[str, type]:
    """Import the modules whose classes register themselves (once; cheap afterwards)."""
    for module in STRATEGY_MODULES:  # in this order: the built-ins list first
        import_module(module)

    return REGISTRY
