"""Every CLI option that sets a config field defaults to that field's own default, so a
default is decided in one place (the config) and the command line cannot drift from the
Python API. The commands are mapped to the configs they build; an option named differently
from its field is mapped by name."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from padlm.cli import app
from padlm.cli.fields import FieldOptions, config_options
from padlm.cli.options import EngineSettings
from padlm.core.config import GenerationConfig
from padlm.data.build import BuildConfig
from padlm.data.samplers import SamplingSettings
from padlm.evaluation.harness import EvalPlan
from padlm.orchestration.configs import PCMTrainConfig
from padlm.server.settings import ServerSettings
from padlm.training.configs import HeadTrainingConfig, TrainConfig

# command -> the configs its options fill, each with {option name: field name} where they differ
BUILDS = {
    "generate": [(GenerationConfig, {}), (EngineSettings, {"engine": "engine_name"})],
    "serve": [(ServerSettings, {name.removesuffix("_s"): name for name in (
        "request_timeout_s", "drain_timeout_s", "keep_alive_timeout_s", "header_timeout_s",
        "body_timeout_s", "body_chunk_timeout_s")}),
              (EngineSettings, {"engine": "engine_name"})],
    "eval": [(EvalPlan, {}), (GenerationConfig, {}),
             (EngineSettings, {"engine": "engine_name"})],
    "data build": [(BuildConfig, {})],
    "data label-check": [(SamplingSettings, {})],
    "train persrm": [(HeadTrainingConfig, {}), (TrainConfig, {"weight": "recommended_weight"})],
    "train experts": [(HeadTrainingConfig, {"head_form": "form"}), (TrainConfig, {})],
    "train pcm": [(PCMTrainConfig, {})],
}

# deliberate differences, each with its reason
DELIBERATE = {
    ("eval", "seed"): "an evaluation is reproducible by default (seed 0); a generation draws "
                      "a fresh seed when sampling",
    ("eval", "weights"): "the PAD weight sweep the CLI runs when `pad` is evaluated, written "
                         "as text; the plan's empty list is 'no sweep' for Python callers",
    **{("train experts", name): "the experts' heads take the PersRM recipe of "
                                "docs/training.md, not the head trainer's plain DPO"
       for name in ("epochs", "nll_weight", "identity_l2")},
    ("train experts", "form"): "the experts' form (prompted | head | lora | models); the "
                               "head's is --head-form",
    ("train experts", "dimensions"): "the experts to train, one per dimension (each run then "
                                     "sets TrainConfig.dimensions to its own)",
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


def test_train_options_read_comma_lists_and_the_pcm_data_defaults_to_the_pairs():
    from padlm.cli.train import DEFAULT_DATA, PCM, PERSRM_RUN

    given = {parameter.name: parameter.default for parameter in PERSRM_RUN.parameters()}
    assert given["dimensions"] is None and given["holdout_dimensions"] is None
    given.update(data=Path("pairs.jsonl"), out=Path("out"), holdout_dimensions="P3A, P3B")
    config = TrainConfig(**PERSRM_RUN.values(given))
    assert config.holdout_dimensions == ("P3A", "P3B") and config.dimensions == ()
    assert not given  # every option taken
    given = {parameter.name: parameter.default for parameter in PCM.parameters()}
    assert given["data"] == [DEFAULT_DATA]
    assert PCM.values(given)["data"] == (DEFAULT_DATA,)


def test_engine_settings_are_open_engines_arguments():
    """The options generate, serve and eval open an engine with are open_engine's own
    parameters, with its defaults (the engine is opened with them as they are)."""
    from padlm.engines import open_engine

    opened = inspect.signature(open_engine).parameters
    settings = {f.name: f.default for f in dataclasses.fields(EngineSettings)}
    assert settings == {name: p.default for name, p in opened.items()}

