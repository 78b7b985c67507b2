"""Orchestration (MoPE): mixing math against brute force, experts, strategies, PCM, REBEL."""

from __future__ import annotations

import math

import pytest
import torch

from padlm import guidance

# --- the mixing math, against brute force and hand-computed numbers ---


def test_mixture_log_probs_is_the_brute_force_mixture_and_sums_to_one():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 3  # 3 rows, 4 experts, vocab 11
    alpha = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.25, 0.25]])
    mixed = guidance.mixture_log_probs(logits.log_softmax(-1), alpha).exp()
    for b in range(3):
        for token in range(11):
            brute = sum(
                alpha[b, i] * math.exp(logits[b, i, token])
                / sum(math.exp(logits[b, i, t]) for t in range(11))
                for i in range(4))
            assert mixed[b, token].item() == pytest.approx(float(brute), rel=1e-5)
    assert torch.allclose(mixed.sum(-1), torch.ones(3))
    # a one-hot weight is exactly that expert's distribution
    assert torch.allclose(mixed[1], logits[1, 0].softmax(-1))


def test_mixture_of_gathered_token_log_probs_matches_the_vocabulary_mixture():
    torch.manual_seed(1)
    logits = torch.randn(5, 3, 7)
    alpha = torch.rand(5, 3).softmax(-1)
    tokens = torch.tensor([0, 3, 6, 2, 2])
    log_probs = logits.log_softmax(-1)
    full = guidance.mixture_log_probs(log_probs, alpha).gather(1, tokens[:, None])[:, 0]
    gathered = log_probs.gather(2, tokens[:, None, None].expand(5, 3, 1))  # [5, 3, 1]
    assert torch.allclose(guidance.mixture_log_probs(gathered, alpha)[:, 0], full)


def test_logit_mixture_is_the_weighted_sum_and_ignores_zero_weight_infinities():
    z = torch.tensor([[[1.0, 2.0, float("-inf")], [3.0, -1.0, 0.5]]])
    out = guidance.logit_mixture(z, torch.tensor([[0.0, 1.0]]))
    assert out.tolist() == [[3.0, -1.0, 0.5]]
    out = guidance.logit_mixture(z, torch.tensor([[0.25, 0.75]]))
    assert out[0, :2].tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75]
    assert out[0, 2] == float("-inf")


def test_average_parameters_is_the_weighted_sum():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    assert guidance.average_parameters([a, b], [0.5, 0.5]).tolist() == [[2.0, 4.0]]
    assert guidance.average_parameters([a, b], [0.25, 0.75]).tolist() == [[2.5, 5.0]]
    with pytest.raises(ValueError):
        guidance.average_parameters([a, b], [1.0])


def test_weight_entropy():
    alpha = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert guidance.weight_entropy(alpha).tolist() == pytest.approx([0.0, math.log(3)])


def test_rebel_loss_on_hand_computed_numbers():
    # ratio gap = (-1.0 + 1.5) - (-2.0 + 1.8) = 0.7; / eta 0.5 = 1.4; minus (0.7 - 0.4) = 1.1
    loss = guidance.rebel_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), torch.tensor([-2.0]),
                               torch.tensor([-1.8]), torch.tensor([0.7]), torch.tensor([0.4]),
                               eta=0.5)
    assert loss.item() == pytest.approx(1.21, rel=1e-6)
    # a mean over pairs; zero where the log-ratio gap is exactly eta times the reward gap
    loss = guidance.rebel_loss(torch.tensor([-1.0, 0.2]), torch.tensor([-1.5, 0.0]),
                               torch.tensor([-2.0, 0.0]), torch.tensor([-1.8, 0.0]),
                               torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.2]), eta=2.0)
    assert loss.item() == pytest.approx(((0.7 / 2 - 0.3) ** 2 + 0.0) / 2, rel=1e-5)
