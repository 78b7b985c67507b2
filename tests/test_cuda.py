"""The decode-loop equivalence tests again, on a CUDA GPU (skipped where there is none).

The fixtures below shadow conftest's with copies of the same models on ``cuda``, and the
imported tests run unchanged against them: every reference they compute is built on the
model's own device, so a tensor made on the wrong device fails here, not on a user's GPU.
``scripts/gpu-check.sh`` runs this module plus ``padlm bench`` on a GPU machine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from padlm import GenerationConfig, Personalizer
from padlm.models import LoadedModel, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from test_decoding import (  # noqa: E402  (re-run on CUDA through the fixtures below)
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

__all__ = [
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


def _on_cuda(lm: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(lm.model).to("cuda"), lm.tokenizer, lm.name)


@pytest.fixture(scope="module")
def default_lm() -> LoadedModel:
    return load_model("default", "float32", "cuda")


@pytest.fixture(scope="module")
def default_engine(default_lm: LoadedModel) -> Personalizer:
    return Personalizer(default_lm, persrm="identity")


@pytest.fixture(scope="module")
def tiny_lm(request) -> LoadedModel:
    return _on_cuda(request.getfixturevalue("tiny_cpu_lm"))


@pytest.fixture
def tiny_engine(tiny_lm: LoadedModel) -> Personalizer:
    return Personalizer(tiny_lm, persrm="identity")


@pytest.mark.parametrize("strategy", ["base", "prompt", "pad", "linear-alignment", "args",
                                      "best-of-n"])
def test_every_strategy_runs_in_bf16_on_the_gpu_by_default(strategy):
    engine = Personalizer("default", persrm="default", device="auto")
    assert engine.device.type == "cuda" and engine.lm.model.dtype == torch.bfloat16
    config = GenerationConfig(max_new_tokens=12, temperature=0.7, seed=1, top_p=0.9)
    [out] = engine.generate(["Why is the sky blue?"], "P1A+P2A", strategy, config, n=2)
    assert out.new_tokens > 0 and out.text


def test_cuda_greedy_equals_cpu_greedy_in_fp32(tiny_cpu_lm):
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True, weight=1.5)
    prompts = ["Describe a cat.", "What is the capital of France?"]
    cpu = Personalizer(tiny_cpu_lm, persrm="identity")
    gpu = Personalizer(_on_cuda(tiny_cpu_lm), persrm="identity")
    for strategy in ("base", "linear-alignment"):
        assert ([g.tokens for g in gpu.generate(prompts, "P1A", strategy, config)]
                == [g.tokens for g in cpu.generate(prompts, "P1A", strategy, config)])
