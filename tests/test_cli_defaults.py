"""Every CLI option that sets a config field defaults to that field's own default, so a
default is decided in one place (the config) and the command line cannot drift from the
Python API. The commands are mapped to the configs they build; an option named differently
from its field is mapped by name."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from padlm.cli import app
from padlm.cli.fields import FieldOptions, config_options
from padlm.core.config import GenerationConfig
from padlm.data.build import BuildConfig
from padlm.data.samplers import SamplingSettings
from padlm.evaluation.harness import EvalPlan
from padlm.orchestration.train_pcm import PCMTrainConfig
from padlm.server.settings import ServerSettings
from padlm.training.head import HeadTrainingConfig
from padlm.training.pipeline import TrainConfig

# command -> the configs its options fill, each with {option name: field name} where they differ
BUILDS = {
    "generate": [(GenerationConfig, {})],
    "serve": [(ServerSettings, {name.removesuffix("_s"): name for name in (
        "request_timeout_s", "drain_timeout_s", "keep_alive_timeout_s", "header_timeout_s",
        "body_timeout_s", "body_chunk_timeout_s")})],
    "eval": [(EvalPlan, {}), (GenerationConfig, {})],
    "data build": [(BuildConfig, {})],
    "data label-check": [(SamplingSettings, {})],
    "train persrm": [(HeadTrainingConfig, {}), (TrainConfig, {"weight": "recommended_weight"})],
    "train pcm": [(PCMTrainConfig, {})],
}

# deliberate differences, each with its reason
DELIBERATE = {
    ("eval", "seed"): "an evaluation is reproducible by default (seed 0); a generation draws "
                      "a fresh seed when sampling",
    ("eval", "weights"): "the PAD weight sweep the CLI runs when `pad` is evaluated, written "
                         "as text; the plan's empty list is 'no sweep' for Python callers",
}


def commands() -> dict[str, object]:
    def walk(group, prefix: str = ""):
        for command in group.registered_commands:
            yield prefix + (command.name or command.callback.__name__), command.callback
        for sub in group.registered_groups:
            callback = sub.typer_instance.registered_callback
            if callback is not None and callback.callback is not None:  # `padlm eval` itself
                yield prefix + sub.name, callback.callback
            yield from walk(sub.typer_instance, f"{prefix}{sub.name} ")

    return dict(walk(app))


def field_defaults(config) -> dict[str, object]:
    defaults = {}
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def same_default(option: object, field: object) -> bool:
    """Equal, or the option's ``None`` standing for a collection field's default (a list
    option not given: the command passes the config's own default on)."""
    return option == field or (option is None and isinstance(field, tuple | list | dict))


@pytest.mark.parametrize("command", sorted(BUILDS))
def test_no_cli_default_differs_from_its_configs(command):
    parameters = inspect.signature(commands()[command]).parameters
    compared, differing = 0, []
    for config, renamed in BUILDS[command]:
        defaults = field_defaults(config)
        for name, parameter in parameters.items():
            field = renamed.get(name, name)
            if (field not in defaults or parameter.default is inspect.Parameter.empty
                    or (command, name) in DELIBERATE):
                continue
            compared += 1
            if not same_default(parameter.default, defaults[field]):
                differing.append(f"--{name.replace('_', '-')} {parameter.default!r} vs "
                                 f"{config.__name__}.{field} {defaults[field]!r}")
    assert compared, f"{command} shares no option with its configs"
    assert not differing, differing


def test_generated_options_take_the_fields_defaults_and_build_the_config():
    @config_options(decoding=FieldOptions(GenerationConfig, ("top_k", "stop", "seed"),
                                          helps={"top_k": "k", "stop": "s", "seed": "x"},
                                          names={"top_k": "candidates"},
                                          defaults={"seed": 0}))
    def command(*, decoding: dict, other: int = 1) -> None:
        built.append((GenerationConfig(**decoding), other))

    built: list = []
    parameters = inspect.signature(command).parameters
    assert list(parameters) == ["candidates", "stop", "seed", "other"]
    assert parameters["candidates"].default is None and parameters["seed"].default == 0
    assert parameters["stop"].default is None  # repeatable: absent means the field's ()
    command(candidates=3, stop=None, seed=5, other=2)
    command(candidates=None, stop=["a", "b"], seed=0, other=1)
    assert built == [(GenerationConfig(top_k=3, seed=5), 2),
                     (GenerationConfig(stop=("a", "b"), seed=0), 1)]


def test_a_generated_option_needs_help_and_an_existing_field():
    with pytest.raises(TypeError, match="GenerationConfig.top_k has no help"):
        FieldOptions(GenerationConfig, ("top_k",)).parameters()
    with pytest.raises(TypeError, match="no field nope"):
        FieldOptions(GenerationConfig, ("nope",))
