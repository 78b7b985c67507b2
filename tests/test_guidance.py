"""The pure guidance math against hand-computed and brute-force references."""

import itertools

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from padlm.core import guidance


def pad_step(base: torch.Tensor, reward: torch.Tensor, k: torch.Tensor,
             weight: torch.Tensor) -> torch.Tensor:
    """PAD over the whole vocabulary, the base model as the reference."""
    return guidance.guided_step(base, k, weight, lambda candidates, valid: (
        guidance.pad_token_reward(base.gather(1, candidates), reward.gather(1, candidates),
                                  valid)))


def test_pad_step_equals_linear_mix_of_logits_plus_constant():
    torch.manual_seed(0)
    base, reward = torch.randn(3, 50), torch.randn(3, 50)
    k = torch.tensor([10, 10, 10])
    weight = torch.tensor([0.0, 0.8, 1.5])
    candidates, _ = guidance.top_k_candidates(base, k)
    scores = pad_step(base, reward, k, weight).gather(1, candidates)
    zb, zr = base.gather(1, candidates), reward.gather(1, candidates)
    mix = (1 - weight[:, None]) * zb + weight[:, None] * zr
    difference = scores - mix  # must be one constant per row
    assert torch.allclose(difference, difference[:, :1].expand_as(difference), atol=1e-5)
    expected_constant = weight * (zb.logsumexp(-1) - zr.logsumexp(-1))
    assert torch.allclose(difference[:, 0], expected_constant, atol=1e-5)
    outside = torch.ones_like(base, dtype=torch.bool).scatter(1, candidates, False)
    assert torch.isneginf(pad_step(base, reward, k, weight)[outside]).all()


def test_pad_weight_zero_picks_base_greedy_token():
    torch.manual_seed(1)
    base, reward = torch.randn(5, 100), torch.randn(5, 100) * 10
    full = pad_step(base, reward, torch.full((5,), 10), torch.zeros(5))
    assert torch.equal(full.argmax(-1), base.argmax(-1))


def test_pad_token_reward_by_hand():
    base = torch.tensor([[2.0, 1.0, 0.0]])
    reward = torch.tensor([[0.0, 1.0, 2.0]])
    valid = torch.tensor([[True, True, False]])  # k = 2: the third is not a candidate
    r = guidance.pad_token_reward(base, reward, valid)
    lse_b = torch.log(torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(1.0)))
    lse_r = torch.log(torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(1.0)))
    expected = torch.tensor([[0.0 - lse_r - (2.0 - lse_b), 1.0 - lse_r - (1.0 - lse_b), 0.0]])
    assert torch.allclose(r, expected, atol=1e-6)


def test_per_row_top_k_masks_extra_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    candidates, valid = guidance.top_k_candidates(logits, torch.tensor([1, 3]))
    assert candidates.tolist() == [[0, 1, 2], [3, 2, 1]]
    assert valid.tolist() == [[True, False, False], [True, True, True]]
    full = pad_step(logits, logits, torch.tensor([1, 3]), torch.ones(2))
    assert torch.isfinite(full).sum(-1).tolist() == [1, 3]


def test_linear_alignment_by_hand():
    preferred = torch.tensor([[1.0, 3.0]])
    neutral = torch.tensor([[2.0, 1.0]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    scores = guidance.linear_alignment_scores(preferred, neutral, torch.tensor([0.5]), valid)
    assert scores.tolist() == [[1.0 + 0.5 * (1 - 2), 3.0 + 0.5 * (3 - 1)]]


def test_echo_guard_caps_only_the_bonus_of_marked_candidates():
    candidates = torch.tensor([[4, 7, 9], [4, 7, 9]])
    echo = guidance.echo_candidates(candidates, [torch.tensor([7, 9, 100]), None])
    assert echo.tolist() == [[False, True, True], [False, False, False]]
    reward = torch.tensor([[1.5, 2.0, -3.0], [1.5, 2.0, -3.0]])
    # a marked bonus becomes 0, a marked penalty stays, unmarked rows are untouched
    assert guidance.cap_echo(reward, echo).tolist() == [[1.5, 0.0, -3.0], [1.5, 2.0, -3.0]]
    assert guidance.cap_echo(reward, None) is reward


def test_pad_and_linear_alignment_with_echo_guard_by_hand():
    preferred = torch.tensor([[1.0, 3.0, 0.0]])
    neutral = torch.tensor([[2.0, 1.0, 0.5]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    echo = torch.tensor([[False, True, True]])
    la = guidance.linear_alignment_scores(preferred, neutral, torch.tensor([0.5]), valid,
                                          echo=echo)
    assert la.tolist() == [[1.0 + 0.5 * (1 - 2), 3.0 + 0.0, 0.0 + 0.5 * (0 - 0.5)]]
    reward_logits = torch.tensor([[0.0, 4.0, -1.0]])
    plain = guidance.pad_token_reward(neutral, reward_logits, valid)
    guarded = guidance.guided_scores(preferred, plain, torch.tensor([2.0]), valid, echo)
    expected = preferred + 2.0 * torch.where(echo, plain.clamp(max=0), plain)
    assert torch.allclose(guarded, expected)
    assert plain[0, 1] > 0 and guarded[0, 1] == preferred[0, 1]  # the bonus really was cut


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    previous = [[1, 4, 4, 7], [2, 29]]
    ours = guidance.apply_repetition_penalty(logits, previous, torch.tensor([1.3, 1.3]))
    for row in range(2):
        theirs = RepetitionPenaltyLogitsProcessor(1.3)(
            torch.tensor([previous[row]]), logits[row:row + 1].clone())
        assert torch.allclose(ours[row], theirs[0])


def brute_force_banned(tokens, n):
    banned = set()
    for i in range(len(tokens) - n + 1):
        if tokens[i:i + n - 1] == tokens[len(tokens) - n + 1:]:
            banned.add(tokens[i + n - 1])
    return banned


@pytest.mark.parametrize("n", [2, 3, 4])
def test_banned_ngrams_match_brute_force(n):
    for tokens in itertools.product(range(3), repeat=7):
        tokens = list(tokens)
        assert guidance.banned_ngram_tokens(tokens, n) == brute_force_banned(tokens, n)


def test_no_repeat_ngram_masks_only_banned_tokens():
    logits = torch.zeros(1, 5)
    out = guidance.apply_no_repeat_ngram(logits, [[1, 2, 3, 1, 2]], [3])
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, [0, 1, 2, 4]]).all()


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(guidance.top_p_filter(logits, torch.tensor([0.8])))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(guidance.top_p_filter(logits, torch.tensor([0.1])))
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_probe_agrees_with_a_full_sort(top_p):
    """Rows whose nucleus fits in the probe and rows that need the full sort both keep
    exactly the tokens a full-vocabulary sort keeps (up to float ties at the boundary)."""
    generator = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, 5000, generator=generator)
    peaked[:, :5] += 10  # nucleus inside the probe
    flat = torch.randn(3, 5000, generator=generator) * 0.1  # nucleus far wider than the probe
    logits = torch.cat([peaked, flat])
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    reference = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, before < top_p)
    kept = guidance.top_p_filter(logits, torch.full((6,), top_p), probe=64).isfinite()
    assert (kept != reference).sum() <= 1
    assert torch.equal(guidance.top_p_filter(logits, torch.ones(6)), logits)  # top-p 1: all


def test_choose_tokens_greedy_and_seeded_sampling():
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.4, 0.3, 0.3]]))
    greedy = guidance.choose_tokens(scores, torch.zeros(2), torch.ones(2), [None, None])
    assert greedy.tolist() == [1, 0]

    def draw(seed):
        generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
        return [guidance.choose_tokens(scores, torch.ones(2), torch.ones(2), generators).tolist()
                for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_sampling_never_picks_non_candidates():
    scores = torch.full((1, 10), guidance.NEG_INF)
    scores[0, [2, 7]] = torch.tensor([0.0, 0.1])
    generator = [torch.Generator().manual_seed(0)]
    picks = {int(guidance.choose_tokens(scores, torch.tensor([2.0]), torch.ones(1), generator))
             for _ in range(50)}
    assert picks <= {2, 7}


def test_sampled_frequencies_follow_the_tempered_nucleus():
    """4000 seeded draws: frequencies match softmax(z / T) renormalised over the nucleus."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([guidance.choose_tokens(logits, torch.tensor([2.0]),
                                                torch.tensor([0.8]), [generator])[0]
                         for _ in range(4000)])
    tempered = (logits[0] / 2.0).softmax(-1)  # [.38, .29, .21, .12]: mass before the last .88
    expected = torch.cat([tempered[:3] / tempered[:3].sum(), torch.zeros(1)])
    observed = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(observed, expected, atol=0.03)
