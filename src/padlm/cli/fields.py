"""Command-line options generated from a config dataclass's fields (the idea of TRL's
``HfArgumentParser``): an option's type, default and help are the field's own, written once,
so the command line cannot drift from the Python API.

A command declares one parameter per config it fills, ``decoding: dict`` say, and
:func:`config_options` replaces that parameter with the options of the chosen fields; the
command receives the parsed values as ``{field name: value}`` and builds the config itself, so
it still checks its other arguments first and the config's own validation names the field.

Only torch-free config modules can be read here: the whole command tree is built on every
start, ``padlm --help`` included.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import typer

Command = TypeVar("Command", bound=Callable[..., None])

# padlm.core.config.GenerationConfig's fields carry no help of their own: config.py is the kernel's
# torch-free settings module, owned apart from the CLI. These texts could move into its
# fields' metadata={"help": ...}; FieldOptions reads the metadata first.
GENERATION_HELP = {
    "max_new_tokens": "New tokens per response, at most.",
    "temperature": "0 = greedy.",
    "top_p": "Nucleus sampling: the smallest set of tokens whose probability reaches this.",
    "seed": "Sampling seed (none: a fresh one each run).",
    "stop": "Stop string (repeatable).",
    "no_repeat_ngram_size": "No n-gram of this size repeats in the response (0: off; "
                            "P-Soups used 3).",
    "repetition_penalty": "Divides the scores of tokens already in the response (1: off).",
    "weight": "Guidance weight (PAD w, Linear Alignment alpha, ARGS w); default: the "
              "PersRM's saved weight for pad (and args with --scorer persrm), 10 for args "
              "with the dimension rewards, 1.0 for linear-alignment.",
    "top_k": "Candidates per step; default: the PersRM's saved top-k for pad, else 10.",
    "echo_guard": "pad / linear-alignment: no guidance bonus for the preference's own words.",
    "mix": "mix / soups: expert weights pcm | uniform | logit | fixed:w1,w2,... (default: "
           "pcm when the experts have a trained PCM, else uniform).",
}


@dataclass(frozen=True)
class FieldOptions:
    """The options one command takes from one config dataclass: ``fields`` in option order;
    ``helps`` for fields whose metadata has no help; ``names`` an option named apart from its
    field; ``defaults`` a default the command deliberately sets apart from the field's (the
    command says why where it declares it); ``parsers`` a field the command line writes as
    one text (a comma list for a tuple, say), parsed into the field's value."""

    config: type
    fields: tuple[str, ...]
    helps: Mapping[str, str] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)
    parsers: Mapping[str, Callable[[str], object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(self.config)}
        unknown = set(self.fields) - known
        if unknown:
            raise TypeError(f"{self.config.__name__} has no field {', '.join(sorted(unknown))}")

    def option_name(self, name: str) -> str:
        return self.names.get(name, name)

    def parameters(self) -> list[inspect.Parameter]:
        """Each field as a keyword parameter typer reads: ``Annotated[type, Option(help)]``
        with the field's default. A tuple field becomes a repeatable option and a parsed field
        a text option; either, when absent (``None``), stands for the field's default, unless
        the command sets a default of its own."""
        by_name = {f.name: f for f in dataclasses.fields(self.config)}
        parameters = []
        for name in self.fields:
            spec = by_name[name]
            help_text = spec.metadata.get("help") or self.helps.get(name)
            if not help_text:
                raise TypeError(f"{self.config.__name__}.{name} has no help text")
            kind = _hints(self.config)[name]
            if name in self.parsers:
                kind = str | None
            elif _repeatable(self.config, name):
                kind = list[typing.get_args(kind)[0]] | None
            if name in self.defaults:
                default = self.defaults[name]
            elif self._absent_is_default(name):
                default = None
            elif spec.default is not dataclasses.MISSING:
                default = spec.default
            else:
                default = inspect.Parameter.empty  # a required option
            parameters.append(inspect.Parameter(
                self.option_name(name), inspect.Parameter.KEYWORD_ONLY, default=default,
                annotation=Annotated[kind, typer.Option(help=help_text)]))
        return parameters

    def _absent_is_default(self, name: str) -> bool:
        """A repeatable or parsed option's type is not its field's (a list or a text for a
        tuple), so it cannot carry the field's default: ``None`` stands for it."""
        return name in self.parsers or _repeatable(self.config, name)

    def values(self, given: dict[str, Any]) -> dict[str, Any]:
        """Take this config's options out of a command's keyword arguments, by field name;
        an absent repeatable or parsed option leaves its field to the config's default."""
        values = {}
        for name in self.fields:
            value = given.pop(self.option_name(name))
            if value is None and self._absent_is_default(name):
                continue
            if name in self.parsers:
                value = self.parsers[name](value)
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return values


@functools.cache
def _hints(config: type) -> dict[str, Any]:
    return typing.get_type_hints(config)


def _repeatable(config: type, name: str) -> bool:
    return typing.get_origin(_hints(config)[name]) is tuple


def config_options(**configs: FieldOptions) -> Callable[[Command], Command]:
    """Replace each parameter of the command named in ``configs`` with that config's options;
    the command then receives that parameter as ``{field name: value}``."""

    def decorate(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters.values()
        parameters = []
        for parameter in own:
            if parameter.name in configs:
                parameters.extend(configs[parameter.name].parameters())
            else:  # keyword-only: typer passes keywords, and order no longer ties defaults
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def parsed(**given: Any) -> None:
            for name, options in configs.items():
                given[name] = options.values(given)
            command(**given)

        parsed.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return typing.cast(Command, parsed)

    return decorate
