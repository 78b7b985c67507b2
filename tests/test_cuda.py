"""The decode loop and the other device-facing paths again, on a CUDA GPU (skipped where
there is none): the decode-loop equivalences, PersRM head training, PCM training, ``padlm
eval``, ``mix`` and ``soups``, a LoRA PersRM, and the server streaming a request.

``PADLM_TEST_DEVICE`` names the device (default ``cuda``); ``scripts/gpu-check.sh
--dry-run-cpu`` sets it to ``cpu``, so CI runs this module on the CPU and it cannot rot
between GPU runs. The fixtures below shadow conftest's with copies of the same models on that
device, and the imported tests run unchanged against them: every reference they compute is
built on the model's own device, so a tensor made on the wrong device fails here, not on a
user's GPU. Tests of the other modules that build CPU tensors themselves are not imported;
their device versions here reuse those modules' helpers.

``scripts/gpu-check.sh`` runs this module with random weights for the default model (the GPU
machine has no package index and the converted model does not travel), so nothing here needs
the real model's behaviour: where ``test_decoding`` needs an answer that ends on EOS, the
version here makes a token the first prompt says an end-of-turn token too.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import httpx
import pytest
import torch

from padlm import GenerationConfig, Personalizer
from padlm.core.models import LoadedModel, load_model
from padlm.core.persrm import PersonalizedRewardModel

DEVICE = os.environ.get("PADLM_TEST_DEVICE", "cuda")

pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (PADLM_TEST_DEVICE=cpu runs it on the CPU)")

from test_decoding import (  # noqa: E402  (re-run on the device through the fixtures below)
    PREFERENCE,
    lora_persrm,
    perturbed_persrm,
    test_args_incremental_scorer_equals_full_recompute,
    test_batch_equals_each_prompt_alone_with_early_eos,
    test_cached_decode_equals_full_recompute,
    test_linear_alignment_matches_two_separate_contexts,
    test_pad_unconditioned_matches_a_two_context_reference,
    test_pad_with_identity_head_equals_prompting,
    test_pad_with_identity_unconditioned_head_equals_linear_alignment,
    test_same_seed_same_sample_different_seed_differs,
)
from test_engine import (  # noqa: E402
    test_an_open_stream_and_a_generate_run_side_by_side_on_one_engine,
)
from test_guides import (  # noqa: E402
    test_a_guide_equal_to_the_base_reproduces_shared_backbone_pad,
    test_a_separate_guide_equals_recomputing_both_models_every_step,
    test_rows_with_different_references_share_a_batch,
)

__all__ = [
    "test_a_guide_equal_to_the_base_reproduces_shared_backbone_pad",
    "test_a_separate_guide_equals_recomputing_both_models_every_step",
    "test_rows_with_different_references_share_a_batch",
    "test_an_open_stream_and_a_generate_run_side_by_side_on_one_engine",
    "test_args_incremental_scorer_equals_full_recompute",
    "test_batch_equals_each_prompt_alone_with_early_eos",
    "test_cached_decode_equals_full_recompute",
    "test_linear_alignment_matches_two_separate_contexts",
    "test_pad_unconditioned_matches_a_two_context_reference",
    "test_pad_with_identity_head_equals_prompting",
    "test_pad_with_identity_unconditioned_head_equals_linear_alignment",
    "test_same_seed_same_sample_different_seed_differs",
]

PROMPTS = ["Why is the sky blue?", "Name a fruit."]


def _on_device(lm: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(lm.model).to(DEVICE), lm.tokenizer, lm.name)


@pytest.fixture(scope="module")
def default_lm() -> LoadedModel:
    return load_model("default", "float32", DEVICE)


@pytest.fixture(scope="module")
def default_engine(default_lm: LoadedModel) -> Personalizer:
    return Personalizer(default_lm, persrm="identity")


@pytest.fixture(scope="module")
def tiny_lm(request) -> LoadedModel:
    return _on_device(request.getfixturevalue("tiny_cpu_lm"))


@pytest.fixture
def tiny_engine(tiny_lm: LoadedModel) -> Personalizer:
    return Personalizer(tiny_lm, persrm="identity")


def _tokens(generations) -> list[list[int]]:
    return [g.tokens for g in generations]


# ---- decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["base", "prompt", "pad", "linear-alignment", "args",
                                      "best-of-n"])
def test_every_strategy_runs_in_bf16_on_the_gpu_by_default(strategy):
    """On CUDA ``device="auto"`` picks the GPU and bf16; the dry run asks for bf16 on the CPU."""
    on_cuda = DEVICE.startswith("cuda")
    engine = Personalizer("default", persrm="default", device="auto" if on_cuda else DEVICE,
                          dtype=None if on_cuda else "bfloat16")
    assert engine.device.type == torch.device(DEVICE).type
    assert engine.lm.model.dtype == torch.bfloat16
    config = GenerationConfig(max_new_tokens=12, temperature=0.7, seed=1, top_p=0.9)
    [out] = engine.generate(["Why is the sky blue?"], "P1A+P2A", strategy, config, n=2)
    assert out.new_tokens > 0 and out.text


def test_cuda_greedy_equals_cpu_greedy_in_fp32(tiny_cpu_lm):
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True, weight=1.5)
    prompts = ["Describe a cat.", "What is the capital of France?"]
    cpu = Personalizer(tiny_cpu_lm, persrm="identity")
    gpu = Personalizer(_on_device(tiny_cpu_lm), persrm="identity")
    for strategy in ("base", "linear-alignment"):
        assert (_tokens(gpu.generate(prompts, "P1A", strategy, config))
                == _tokens(cpu.generate(prompts, "P1A", strategy, config)))


def test_a_saved_lora_persrm_loads_on_the_device_and_decodes_as_before(tiny_lm, tmp_path):
    persrm = lora_persrm(tiny_lm, init_lora_weights=False)  # a random, non-zero adapter
    engine = Personalizer(tiny_lm, persrm=persrm)
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, weight=2.0)
    before = engine.generate(PROMPTS, PREFERENCE, "pad", config)
    assert _tokens(before) != _tokens(engine.generate(PROMPTS, PREFERENCE, "prompt", config))
    persrm.save(tmp_path / "lora")
    loaded = PersonalizedRewardModel.load(tmp_path / "lora", copy.deepcopy(tiny_lm.model))
    assert loaded.config.lora and not loaded.shares_backbone
    again = Personalizer(tiny_lm, persrm=loaded)
    assert _tokens(again.generate(PROMPTS, PREFERENCE, "pad", config)) == _tokens(before)


def test_the_engine_loads_a_lora_persrm_directory(tiny_lm, tmp_path):
    lora_persrm(tiny_lm).save(tmp_path / "lora")
    engine = Personalizer(tiny_lm, persrm=str(tmp_path / "lora"))
    assert engine.persrm.config.lora


# ---- training ------------------------------------------------------------------------------

def test_a_head_persrm_trains_on_the_device_and_guides_pad(tiny_lm, tiny_cpu_lm, tmp_path):
    from test_training import tiny_rows

    from padlm.training.configs import HeadTrainingConfig, TrainConfig
    from padlm.training.pipeline import run_training

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(row.to_json() + "\n" for row in tiny_rows()))
    config = TrainConfig(data=data, out=tmp_path / "persrm", stage="head",
                         head=HeadTrainingConfig(epochs=3, rank=4, lr=5e-2, batch_pairs=8),
                         cache_dir=tmp_path / "cache", validation_fraction=0.3)
    trained = run_training(tiny_lm, config)
    history = trained.config.training["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    weight = trained.head.weight.detach().cpu()
    assert not torch.equal(weight, torch.eye(weight.shape[0]))
    generation = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    here = Personalizer(tiny_lm, persrm=str(config.out))
    on_cpu = Personalizer(tiny_cpu_lm, persrm=str(config.out))
    assert (_tokens(here.generate(PROMPTS, "P2A", "pad", generation))
            == _tokens(on_cpu.generate(PROMPTS, "P2A", "pad", generation)))


def test_the_pcm_trains_on_the_device_and_mix_reads_it(tiny_lm, tmp_path):
    from test_orchestration import COMBO, _decode, _pcm_config

    from padlm.core.preferences import PSOUPS
    from padlm.orchestration.experts import load_experts, prompted_experts
    from padlm.orchestration.rewards import DimensionRewards
    from padlm.orchestration.strategies import MixStrategy
    from padlm.orchestration.train_pcm import PCMTrainer

    generator = torch.Generator().manual_seed(0)
    rewards = DimensionRewards({d: torch.randn(768, generator=generator) for d in PSOUPS})
    out = tmp_path / "experts"
    trainer = PCMTrainer(prompted_experts(tiny_lm), _pcm_config(out, steps=2), rewards)
    trainer.train()
    loaded = load_experts(out, tiny_lm)
    assert loaded.pcm is not None
    rows = _decode(MixStrategy(loaded), tiny_lm, COMBO, mix="pcm")
    assert all(len(row.tokens) == 8 for row in rows)
    weights = rows[0].trace[0]
    assert set(weights) == set(COMBO.split("+"))
    assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-4)


# ---- orchestration, evaluation, the server -------------------------------------------------

def test_mix_and_soups_run_with_head_experts_and_the_shipped_ones(tiny_lm, default_lm):
    from test_orchestration import COMBO, _random_heads

    from padlm.core.preferences import PSOUPS
    from padlm.orchestration.experts import Experts, ExpertsConfig

    hidden = tiny_lm.model.config.hidden_size
    heads = {d: head.to(tiny_lm.device) for d, head in _random_heads(hidden, PSOUPS).items()}
    experts = Experts(ExpertsConfig("head", list(PSOUPS), tiny_lm.name, hidden), tiny_lm, heads)
    engine = Personalizer(tiny_lm, persrm="identity", components={"experts": experts})
    [mixed] = engine.generate(["Name a fruit."], "P1A+P2B", "mix",
                              GenerationConfig(max_new_tokens=4, mix="fixed:0,1"))
    [alone] = engine.generate(["Name a fruit."], "P2B", "mix",
                              GenerationConfig(max_new_tokens=4, mix="uniform"))
    assert mixed.tokens == alone.tokens
    [soup] = engine.generate(["Name a fruit."], "P1A+P2B", "soups",
                             GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert soup.new_tokens == 4
    # the default model's experts: the shipped heads and PCM where it is the shipped model's
    # shape (its PCM embeds the request with MiniLM), prompted experts otherwise
    shipped = Personalizer(default_lm, persrm="default")
    for strategy, mix in (("mix", None), ("mix", "uniform"), ("soups", None)):
        config = GenerationConfig(max_new_tokens=4, ignore_eos=True, mix=mix)
        [out] = shipped.generate(PROMPTS[:1], COMBO, strategy, config)
        assert out.new_tokens == 4, (strategy, mix)


def test_padlm_eval_runs_two_prompts_on_the_device(tmp_path):
    """``padlm eval`` end to end on the default model: the shipped PersRM and experts, the
    rule and embedding judges, 2 prompts, 2 preferences, 4 tokens."""
    result = subprocess.run(
        [sys.executable, "-m", "padlm", "eval", "--limit", "2", "--preferences", "P2A,P3A",
         "--strategies", "base,pad,mix", "--weights", "", "--max-new-tokens", "4",
         "--device", DEVICE, "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["strategy"] for r in summary["rows"]} == {"base", "pad", "mix"}
    assert all(r["n"] == 2 for r in summary["rows"])


def test_the_server_streams_a_request_as_the_library_decodes_it(tiny_lm):
    from padlm.server.app import ServerThread, create_app

    engine = Personalizer(tiny_lm, persrm=perturbed_persrm(tiny_lm, scale=0.5))
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 5,
            "stream": True, "preference": "P2A", "strategy": "pad", "token_rewards": True,
            "ignore_eos": True}
    with (ServerThread(create_app(engine, max_batch_size=4, max_queue=8)) as server,
          httpx.Client(trust_env=False, timeout=120) as client,
          client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c.get("choices"))
    rewards = [c["padlm"]["reward"] for c in chunks if "padlm" in c]
    assert len(rewards) == 5 and all(math.isfinite(r) for r in rewards)
    [expected] = engine.generate(PROMPTS[:1], "P2A", "pad",
                                 GenerationConfig(max_new_tokens=5, ignore_eos=True))
    assert text == expected.text
