"""Device and dtype discipline, checked on a CPU-only machine.

Device mixing: the pure tensor functions of a decode step (the head's product at PAD's
candidate rows, PAD's and Linear Alignment's rules, the MoPE mixtures, REBEL's loss) run on
inputs on PyTorch's ``meta`` device, which has shapes but no data and refuses a CPU tensor in
most ops (elementwise, ``where``, ``index_add``; not ``gather`` or ``matmul``), so a tensor
made on the CPU inside them fails on this machine rather than on a user's GPU. (PyTorch's
fake-tensor mode can fake ``cuda`` itself, but a CPU-only build aborts on float matmuls and
``~mask`` under it.) Neither can run code that reads values (``.tolist()``, ``int(t)``,
``torch.equal``): the decode loop, the trainers and the models are left to
``tests/test_cuda.py`` on a GPU and its CPU dry run.

Precision: the value head computes ``W h + b`` in float32 for any model dtype, so a trained
head's small changes survive a bfloat16 model.
"""

from __future__ import annotations

import pytest
import torch

from padlm import GenerationConfig, Personalizer
from padlm.core import guidance
from padlm.core.kvstream import response_hidden
from padlm.core.models import load_model
from padlm.core.persrm import PersonalizedRewardModel, ValueHead
from padlm.core.strategies import PREFERENCE, reference_lanes, render_lanes
from padlm.training.head import HeadParam

ROWS, K, VOCAB, HIDDEN = 3, 4, 50, 16


META = torch.device("meta")


def test_meta_catches_a_cpu_tensor_meeting_a_device_one():
    source = torch.ones(ROWS, device=META)
    segment = torch.zeros(ROWS, dtype=torch.long, device=META)
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(2).index_add(0, segment, source)  # the bug train pcm had
    assert source.new_zeros(2).index_add(0, segment, source).device == META


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_the_heads_product_stays_on_the_models_device(model_dtype):
    """The head's output and PAD's reward logits are float32 on the model's device, for a
    float32 or a bfloat16 model."""
    meta = META
    persrm = PersonalizedRewardModel.identity("fake", HIDDEN)
    persrm.head.to(meta)
    hidden = torch.zeros(ROWS, HIDDEN, dtype=model_dtype, device=meta)
    lm_head = torch.zeros(VOCAB, HIDDEN, dtype=model_dtype, device=meta)
    candidates = torch.zeros(ROWS, K, dtype=torch.long, device=meta)
    reward_k = persrm.reward_logits(hidden, lm_head, candidates)
    assert reward_k.device == meta and reward_k.dtype == torch.float32
    assert persrm.reward_logits(hidden, lm_head).shape == (ROWS, VOCAB)


def test_pad_and_linear_alignment_rules_stay_on_the_device():
    candidates = torch.zeros(ROWS, K, dtype=torch.long, device=META)
    valid = torch.ones(ROWS, K, dtype=torch.bool, device=META)
    base_k = torch.zeros(ROWS, K, device=META)
    reward_k = torch.zeros(ROWS, K, device=META)
    weight = torch.ones(ROWS, device=META)
    echo = torch.zeros(ROWS, K, dtype=torch.bool, device=META)
    scores = guidance.guided_scores(
        base_k, guidance.pad_token_reward(base_k, reward_k, valid), weight, valid, echo)
    la = guidance.linear_alignment_scores(base_k, reward_k, weight, valid, base_k, echo)
    for full in (guidance.scatter_to_vocab(candidates, scores, VOCAB),
                 guidance.scatter_to_vocab(candidates, la, VOCAB)):
        assert full.device == META and full.shape == (ROWS, VOCAB)


def test_mixtures_and_rebel_stay_on_the_device():
    experts = torch.zeros(ROWS, 3, VOCAB, device=META)
    alpha = torch.full((ROWS, 3), 1 / 3, device=META)
    assert guidance.mixture_log_probs(experts, alpha).device == META
    assert guidance.logit_mixture(experts, alpha).device == META
    assert guidance.weight_entropy(alpha).device == META
    heads = [torch.zeros(HIDDEN, HIDDEN, device=META) for _ in range(3)]
    assert guidance.average_parameters(heads, [0.2, 0.3, 0.5]).device == META
    logp = torch.zeros(2, device=META)
    assert guidance.rebel_loss(logp, logp, logp, logp, logp, logp, 1.0).device == META


@pytest.mark.parametrize("form", ["full", "lowrank", "diagonal"])
def test_a_training_heads_matrix_stays_on_its_device(form):
    """The trained head's ``W`` is copied into the PersRM after training on the device (the
    GPU check found its identity built on the CPU)."""
    head = HeadParam(HIDDEN, form=form, rank=2).to(META)
    assert head.weight().device == META and head.distance_from_identity().device == META


def test_head_is_exact_on_the_cpu_and_knows_the_identity():
    head = ValueHead(HIDDEN)
    assert head.is_identity()
    with torch.no_grad():
        head.bias[0] = 1e-3
    assert not head.is_identity()


def test_a_trained_heads_change_survives_a_bfloat16_model():
    """A head near the identity (what DPO training leaves: diagonal changes of ~1e-3, which
    bf16 rounds to 1) changes a bf16 hidden state as float64 says, to 0.5%."""
    torch.manual_seed(0)
    d = 576
    head = ValueHead(d)
    with torch.no_grad():
        head.weight.add_(torch.diag(torch.randn(d) * 1e-3) + torch.randn(d, d) * 1e-4)
        head.bias.copy_(torch.randn(d) * 1e-3)
    hidden = torch.randn(64, d).to(torch.bfloat16)
    exact = (hidden.double() @ head.weight.double().T + head.bias.double()) - hidden.double()
    change = head(hidden).double() - hidden.double()
    relative = (change - exact).norm() / exact.norm()
    assert head.weight.dtype == torch.float32 and head(hidden).dtype == torch.float32
    assert relative < 5e-3, f"the head's change is off by {relative:.2%}"
    # what the head did before: W and b cast to the hidden dtype
    blurred = torch.nn.functional.linear(hidden, head.weight.to(torch.bfloat16),
                                         head.bias.to(torch.bfloat16)).double() - hidden.double()
    assert (blurred - exact).norm() / exact.norm() > 5e-2


BF16_PROMPTS = ["Why is the sky blue?", "How do vaccines work?",
                "Give me three tips for a job interview.", "What is a black hole?"]


def pad_rewards(engine, prompt: str, response: list[int], candidates: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """PAD's token reward ``r(a)`` at every position of ``response`` for the base top-k (or
    the given ``candidates``), teacher-forced: both lanes' states in one batched forward."""
    lm, persrm = engine.lm, engine.persrm
    lanes = (PREFERENCE, *reference_lanes(persrm))
    contexts = render_lanes(lm.tokenizer, engine.request(prompt, "P1A"), lanes, engine.placement)
    states = response_hidden(lm.model, contexts, [response] * len(contexts))
    lm_head = lm.model.get_output_embeddings().weight
    with torch.inference_mode():
        base = (states[0] @ lm_head.T).float()
        reference = (states[-1] @ lm_head.T).float()
        if candidates is None:
            candidates = base.topk(persrm.config.top_k, dim=-1).indices
        valid = torch.ones_like(candidates, dtype=torch.bool)
        reward = guidance.pad_token_reward(reference.gather(1, candidates),
                                           persrm.reward_logits(states[0], lm_head, candidates),
                                           valid)
    return candidates, reward


def test_bf16_pad_agrees_with_fp32_pad_on_the_default_model(default_lm):
    """The shipped PersRM on SmolLM2-135M in float32 and in bfloat16 (the CUDA default):
    greedy PAD outputs and, along the float32 outputs, the token rewards of the same
    candidates. bf16 rounds every logit (8 bits of mantissa), so greedy paths may part where
    two candidates nearly tie; the rewards must still say the same thing. Measured here:
    correlation 0.9985, 84% of each greedy output before the paths part; the bounds leave
    room for other CPUs' kernels but fail a head that blurs or a lane that goes astray."""
    config = GenerationConfig(max_new_tokens=32, no_repeat_ngram_size=3)
    fp32 = Personalizer(default_lm, persrm="default")
    bf16 = Personalizer(load_model("default", "bfloat16", "cpu"), persrm="default")
    outs32 = fp32.generate(BF16_PROMPTS, "P1A", "pad", config)
    outs16 = bf16.generate(BF16_PROMPTS, "P1A", "pad", config)
    agreement, rewards32, rewards16 = [], [], []
    for prompt, a, b in zip(BF16_PROMPTS, outs32, outs16, strict=True):
        common = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False))
                       if x != y),
                      min(len(a.tokens), len(b.tokens)))
        agreement.append(common / max(len(a.tokens), 1))
        candidates, r32 = pad_rewards(fp32, prompt, a.tokens, None)
        _, r16 = pad_rewards(bf16, prompt, a.tokens, candidates)
        rewards32.append(r32.flatten())
        rewards16.append(r16.flatten())
    correlation = float(torch.corrcoef(torch.stack([torch.cat(rewards32),
                                                    torch.cat(rewards16)]))[0, 1])
    prefix = sum(agreement) / len(agreement)
    print(f"bf16 vs fp32 PAD: reward correlation {correlation:.4f}, "
          f"greedy common prefix {prefix:.3f}")
    assert correlation > 0.99
    assert prefix > 0.6
