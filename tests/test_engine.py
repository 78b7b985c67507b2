"""The engine as a foundation: concurrent batches, the registry, saved settings, validation,
incremental detokenization, devices and a torch-free front door."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from padlm import GenerationConfig, Personalizer
from padlm.core.devices import default_dtype, resolve_device
from padlm.core.persrm import PersonalizedRewardModel
from padlm.core.registry import REGISTRY, load_registry, strategy_class, strategy_names
from padlm.errors import PadlmError

PREFERENCE = "P1A"


@pytest.mark.parametrize("strategy", ["prompt", "pad", "linear-alignment", "args"])
def test_an_open_stream_and_a_generate_run_side_by_side_on_one_engine(tiny_engine, strategy):
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    alone_stream = "".join(e.delta for e in tiny_engine.stream("Tell me a story.", PREFERENCE,
                                                               strategy, config))
    alone = tiny_engine.generate(["Hi", "What is 2+2?"], PREFERENCE, strategy, config)
    stream = tiny_engine.stream("Tell me a story.", PREFERENCE, strategy, config)
    first = next(stream).delta  # the stream's batch is open and holds KV state
    during = tiny_engine.generate(["Hi", "What is 2+2?"], PREFERENCE, strategy, config)
    rest = "".join(event.delta for event in stream)
    assert [g.tokens for g in during] == [g.tokens for g in alone]
    assert first + rest == alone_stream


def test_every_registered_strategy_declares_a_consistent_spec():
    load_registry()
    assert {"base", "prompt", "pad", "linear-alignment", "args", "best-of-n"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.spec.name == name
        assert cls.spec.level in ("token", "sequence")
    assert strategy_names(echo_guard=True) == ("pad", "linear-alignment")
    assert strategy_names(uses_persrm=True) == ("pad",)
    assert strategy_names(uses_scorer=True) == ("args", "best-of-n")
    with pytest.raises(PadlmError, match="unknown strategy 'nope'") as caught:
        strategy_class("nope")
    assert caught.value.param == "strategy"


def test_engine_batches_are_independent_objects(tiny_engine):
    first, second = tiny_engine.batch("pad"), tiny_engine.batch("pad")
    assert first.strategy is second.strategy  # stateless, shared
    assert first.streams[0] is not second.streams[0]  # each batch owns its KV state


def test_a_saved_placement_is_honoured_unless_overridden(tiny_lm, tmp_path):
    persrm = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    persrm.config.placement = "bracket"
    persrm.save(tmp_path / "persrm")
    assert Personalizer(tiny_lm, persrm=str(tmp_path / "persrm")).placement == "bracket"
    assert Personalizer(tiny_lm, persrm=str(tmp_path / "persrm"),
                        placement="system").placement == "system"
    assert Personalizer(tiny_lm, persrm="identity").placement == "user-prefix"


def perturbed_persrm(lm, top_k: int, weight: float) -> PersonalizedRewardModel:
    """A PersRM far enough from the identity that its weight and top-k change PAD's tokens,
    saved with ``top_k`` and ``weight``."""
    persrm = PersonalizedRewardModel.identity(lm.name, lm.model.config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        d = persrm.head.weight.shape[0]
        persrm.head.weight.add_(0.5 * torch.randn(d, d, generator=generator))
        persrm.head.bias.add_(0.5 * torch.randn(d, generator=generator))
    persrm.config.top_k, persrm.config.recommended_weight = top_k, weight
    return persrm


def test_a_saved_top_k_and_weight_are_pads_defaults(tiny_lm):
    """Observed in the tokens: a request without top-k or weight decodes exactly as one
    that sets the PersRM's saved values, and unlike one with the values the code would fall
    back to (top-k 10, weight 1.0) had it ignored them."""
    prompts = ["Hi", "Tell me a joke"]

    def tokens(engine, strategy="pad", **settings):
        config = GenerationConfig(max_new_tokens=8, ignore_eos=True, **settings)
        return [g.tokens for g in engine.generate(prompts, PREFERENCE, strategy, config)]

    # saved top-k 1: PAD can only take the prompted model's own greedy token
    engine = Personalizer(tiny_lm, persrm=perturbed_persrm(tiny_lm, top_k=1, weight=1.0))
    assert tokens(engine) == tokens(engine, "prompt")
    assert tokens(engine, top_k=10) != tokens(engine, "prompt")  # so top-k 1 decided it
    # saved top-k 3 and weight 2.5
    engine = Personalizer(tiny_lm, persrm=perturbed_persrm(tiny_lm, top_k=3, weight=2.5))
    saved = tokens(engine)
    assert saved == tokens(engine, top_k=3, weight=2.5)
    assert saved != tokens(engine, top_k=10, weight=2.5)
    # saved weight 2.5 (top-k 10): the weight alone decides
    engine = Personalizer(tiny_lm, persrm=perturbed_persrm(tiny_lm, top_k=10, weight=2.5))
    saved = tokens(engine)
    assert saved == tokens(engine, weight=2.5)
    assert saved != tokens(engine, weight=1.0)
    assert saved != tokens(engine, weight=0.0)


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("temperature", float("nan")), ("top_p", 0.0), ("top_k", 0),
    ("weight", float("inf")), ("repetition_penalty", 0.0), ("no_repeat_ngram_size", -1),
    ("seed", 2**70), ("mix", "fixed:0,0"), ("mix", "banana"), ("stop", ("",)),
])
def test_config_is_validated_at_construction_and_names_its_field(field, value):
    with pytest.raises(PadlmError) as caught:
        GenerationConfig(**{field: value})
    assert caught.value.param == field


def test_incremental_detokenization_equals_decoding_the_whole_response(tiny_engine):
    """Multi-byte characters, leading spaces and special tokens: the streamed text and the
    final text both equal one full decode."""
    tokenizer = tiny_engine.lm.tokenizer
    text = "Café ☕ naïve 東京 — 🙂🙂 end <|im_end|> done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = tiny_engine.batch("base")
    [row] = batch.join([tiny_engine.request("Hi", None, GenerationConfig(
        max_new_tokens=len(ids), ignore_eos=True))])
    streamed = ""
    for token in ids:
        streamed += batch._advance(row, token).delta
    assert row.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert streamed == row.text


def test_a_stop_string_split_across_tokens_is_found_and_cut(tiny_engine):
    tokenizer = tiny_engine.lm.tokenizer
    ids = tokenizer("one two STOP three", add_special_tokens=False)["input_ids"]
    batch = tiny_engine.batch("base")
    [row] = batch.join([tiny_engine.request("Hi", None, GenerationConfig(
        max_new_tokens=50, stop=("STOP",), ignore_eos=True))])
    streamed, finished = "", False
    for token in ids:
        event = batch._advance(row, token)
        streamed += event.delta
        if event.finished:
            finished = True
            break
    assert finished and row.text == "one two " and streamed == row.text


def test_devices_resolve_and_refuse_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_dtype(torch.device("cpu")) == "float32"
    with pytest.raises(PadlmError, match="unknown device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(PadlmError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_best_of_n_samples_are_prompt_rows_and_the_scorer_picks(tiny_engine):
    config = GenerationConfig(max_new_tokens=5, temperature=0.9, seed=3)
    picked = tiny_engine.generate(["Hi"], PREFERENCE, "best-of-n", config, n=3)[0]
    best = tiny_engine.strategy("best-of-n")
    samples = best.sample_requests(tiny_engine.request("Hi", PREFERENCE, config), 3)
    rows = tiny_engine.batch("prompt").run(samples)
    scores = [best.pick_many([row], 1)[0][1] for row in rows]
    assert picked.tokens == rows[max(range(3), key=scores.__getitem__)].tokens
    assert picked.score == pytest.approx(max(scores), abs=1e-5)
    with pytest.raises(PadlmError, match="sequence-level"):
        tiny_engine.batch("best-of-n")


def test_import_padlm_and_help_do_not_load_torch():
    code = ("import sys, padlm, padlm.cli; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_generation_config_stays_a_frozen_dataclass():
    config = GenerationConfig(stop=["a"])  # a list from JSON becomes the tuple it declares
    assert config.stop == ("a",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 3  # type: ignore[misc]
