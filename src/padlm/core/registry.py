"""The strategy registry: what each method is and needs, in one table everyone reads.

Torch-free on purpose: the registry's types and lookups cost nothing to import. The built-in
classes register when :mod:`padlm.core.strategies` imports; a feature package adds its own
strategies and scorers through the ``padlm.plugins`` entry-point group (as vLLM loads its
``vllm.general_plugins``), so the kernel never names one. :func:`load_registry` makes sure
both have run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points

from padlm.core.config import GenerationConfig
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
# (the default: independent of the PersRM) or the PersRM's own implicit reward. The names are
# checked before anything loads; each scorer's factory registers with its code.
SCORERS = ("dimensions", "persrm")
DEFAULT_SCORER = "dimensions"
SCORER_FACTORIES: dict[str, Callable] = {}
BUILT_IN = "padlm.core.strategies"
PLUGIN_GROUP = "padlm.plugins"
_plugins_loaded = False


def register(cls: type) -> type:
    """Class decorator: the one line that makes a strategy exist everywhere."""
    REGISTRY[cls.spec.name] = cls
    return cls


def register_scorer(name: str, factory: Callable) -> None:
    """Make scorer ``name`` (one of :data:`SCORERS`) buildable: ``factory(lm, persrm)``."""
    SCORER_FACTORIES[name] = factory


def scorer_factory(name: str) -> Callable:
    check_scorer(name)
    load_registry()
    if name not in SCORER_FACTORIES:
        raise PadlmError(f"scorer {name!r} comes with a feature package that is not installed "
                         f"(no {PLUGIN_GROUP} entry point registered it)", param="scorer")
    return SCORER_FACTORIES[name]


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
    """Import the built-in strategies, then call each installed plugin's ``register`` (once;
    cheap afterwards). The built-ins list first; plugins follow in entry-point name order."""
    global _plugins_loaded
    import_module(BUILT_IN)
    if not _plugins_loaded:
        for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda point: point.name):
            plugin.load()()
        _plugins_loaded = True
    return REGISTRY
