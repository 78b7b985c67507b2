"""Pure tensor math of decoding-time guidance: no models, no state, per-row parameters.

Every function takes batch-first tensors and per-row parameter tensors (``weight[B]``,
``k[B]``) so that one batch can serve users with different settings. Scores outside the
candidate set are ``-inf``; the decode loop samples from what is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NEG_INF = float("-inf")


def top_k_candidates(logits: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each row's ``k[b]`` best tokens, padded to ``max(k)``, and a validity mask.

    >>> idx, valid = top_k_candidates(torch.tensor([[0.1, 3.0, 2.0]]), torch.tensor([2]))
    >>> idx.tolist(), valid.tolist()
    ([[1, 2]], [[True, True]])
    """
    k_max = int(k.max())
    indices = logits.topk(k_max, dim=-1).indices
    valid = torch.arange(k_max, device=logits.device)[None, :] < k[:, None]
    return indices, valid


def masked_log_softmax(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid entries of each row; invalid entries become ``-inf``."""
    return values.masked_fill(~valid, NEG_INF).log_softmax(dim=-1)


def pad_token_reward(
    reference_logits_k: torch.Tensor | None, reward_logits_k: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """PAD's token reward over the candidates: ``log softmax_K(z_R) - log softmax_K(z_ref)``,
    the reference being the base model (with the preference in context, or without it) or
    the guide's own backbone; ``None``: no reference, the guide's log-probabilities over the
    candidates are the reward (GenARM's autoregressive reward models). 0 where not valid.

    The reward compares the raw models (repetition control shapes only the proposal). With
    the base as its own reference and proposal, PAD's score ``z_b + w * r`` over the
    candidates equals ``(1-w) z_b + w z_R + const``."""
    reward = masked_log_softmax(reward_logits_k, valid)
    if reference_logits_k is not None:
        reward = reward - masked_log_softmax(reference_logits_k, valid)
    return reward.masked_fill(~valid, 0.0)


def echo_candidates(
    candidates: torch.Tensor, guarded: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """True where a candidate is one of its row's ``guarded`` token ids (None: no guard).

    >>> echo_candidates(torch.tensor([[5, 7], [5, 7]]), [torch.tensor([7]), None]).tolist()
    [[False, True], [False, False]]
    """
    mask = torch.zeros_like(candidates, dtype=torch.bool)
    for row, ids in enumerate(guarded):
        if ids is not None and len(ids):
            mask[row] = torch.isin(candidates[row], ids)
    return mask


def cap_echo(reward: torch.Tensor, echo: torch.Tensor | None) -> torch.Tensor:
    """No bonus for echoing: where ``echo`` is set the reward is capped at 0 (a penalty stays).

    Why: a reward measured against the preference-free model (Linear Alignment's shift, an
    unconditioned PersRM) is largest for copying the preference, because conditioning on a
    text makes quoting it likelier; that bonus rewards quoting the preference, not following
    it. The base model's own preference for the quote is left alone.
    """
    return reward if echo is None else torch.where(echo, reward.clamp(max=0.0), reward)


def guided_scores(
    proposal_logits_k: torch.Tensor, reward: torch.Tensor, weight: torch.Tensor,
    valid: torch.Tensor, echo: torch.Tensor | None = None,
) -> torch.Tensor:
    """``score = z_b + w * r`` over the candidates (``-inf`` elsewhere), the reward's bonus
    capped where ``echo`` is set (see ``cap_echo``)."""
    return (proposal_logits_k + weight[:, None] * cap_echo(reward, echo)).masked_fill(
        ~valid, NEG_INF)


def scoreable_candidates(candidates: torch.Tensor, valid: torch.Tensor,
                         scoreable: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates a guide can score: ids below ``scoreable`` (its shared vocabulary with the
    base; None: all), clamped so indexing its lm_head stays in range, and their validity
    (a candidate the guide cannot score gets no reward, neither bonus nor penalty).

    >>> scoreable_candidates(torch.tensor([[3, 9]]), torch.tensor([[True, True]]), 5)
    (tensor([[3, 4]]), tensor([[ True, False]]))
    """
    if scoreable is None:
        return candidates, valid
    return candidates.clamp(max=scoreable - 1), valid & (candidates < scoreable)


def linear_alignment_scores(
    preferred_logits_k: torch.Tensor,
    neutral_logits_k: torch.Tensor,
    alpha: torch.Tensor,
    valid: torch.Tensor,
    proposal_logits_k: torch.Tensor | None = None,
    echo: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear Alignment: ``z_p + alpha (z_p - z_0)`` over the top candidates of ``z_p``;
    ``echo`` caps the shift of the marked candidates at 0 (see ``cap_echo``)."""
    proposal = preferred_logits_k if proposal_logits_k is None else proposal_logits_k
    return guided_scores(proposal, preferred_logits_k - neutral_logits_k, alpha, valid, echo)


def guided_step(
    proposal: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    echo: Callable[[torch.Tensor], torch.Tensor | None] = lambda candidates: None,
) -> torch.Tensor:
    """One guided step over the whole vocabulary: each row's top ``k`` of ``proposal``,
    scored ``z + w * r`` with ``r = reward(candidates, valid)`` (its bonus capped where
    ``echo(candidates)`` marks a candidate), ``-inf`` elsewhere. PAD (the HF strategy and
    the vLLM processor) and Linear Alignment are this step with different rewards, so the
    candidate set, the weighting and the echo cap live here once.

    >>> step = guided_step(torch.tensor([[0.0, 3.0, 2.0]]), torch.tensor([2]),
    ...                    torch.tensor([1.0]), lambda c, v: torch.tensor([[0.0, 5.0]]))
    >>> step.tolist()
    [[-inf, 3.0, 7.0]]
    """
    candidates, valid = top_k_candidates(proposal, k)
    scores = guided_scores(proposal.gather(1, candidates), reward(candidates, valid), weight,
                           valid, echo(candidates))
    return scatter_to_vocab(candidates, scores, proposal.shape[-1])


def scatter_to_vocab(
    candidates: torch.Tensor, scores: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Full-vocabulary score rows: candidate scores in place, ``-inf`` everywhere else."""
    full = torch.full(
        (scores.shape[0], vocab_size), NEG_INF, dtype=scores.dtype, device=scores.device
    )
    return full.scatter(1, candidates, scores)


def apply_repetition_penalty(
    logits: torch.Tensor, previous: Sequence[Sequence[int]], penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL-style penalty as in transformers: divide positive, multiply negative logits."""
    out = logits.clone()
    for row, tokens in enumerate(previous):
        if not tokens or float(penalty[row]) == 1.0:
            continue
        ids = torch.tensor(sorted(set(tokens)), device=logits.device)
        seen = out[row, ids]
        out[row, ids] = torch.where(seen > 0, seen / penalty[row], seen * penalty[row])
    return out


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``tokens`` (n < 1: none)."""
    if n < 1 or len(tokens) < n - 1:
        return set()
    if n == 1:
        return set(tokens)
    prefix = tuple(tokens[len(tokens) - (n - 1):])
    return {
        tokens[i + n - 1]
        for i in range(len(tokens) - n + 1)
        if tuple(tokens[i:i + n - 1]) == prefix
    }


def apply_no_repeat_ngram(
    logits: torch.Tensor, previous: Sequence[Sequence[int]], sizes: Sequence[int]
) -> torch.Tensor:
    out = logits.clone()
    for row, (tokens, n) in enumerate(zip(previous, sizes, strict=True)):
        banned = banned_ngram_tokens(tokens, n)
        if banned:
            out[row, sorted(banned)] = NEG_INF
    return out


def repetition_control(
    logits: torch.Tensor, previous: Sequence[Sequence[int]], penalties: Sequence[float],
    ngram_sizes: Sequence[int],
) -> torch.Tensor:
    """Repetition penalty, then the no-repeat-ngram ban, on each row's own ``previous``
    tokens: one definition for both engines (padlm's loop and its vLLM processor)."""
    if any(penalty != 1.0 for penalty in penalties):
        logits = apply_repetition_penalty(
            logits, previous, torch.tensor(penalties, device=logits.device))
    if any(ngram_sizes):
        logits = apply_no_repeat_ngram(logits, previous, ngram_sizes)
    return logits


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor, probe: int = 256) -> torch.Tensor:
    """Nucleus filtering per row; the most likely token always survives.

    Exact and cheap: a nucleus almost always lies within the ``probe`` most likely tokens, so
    those rows need a top-``probe`` instead of a sort of the whole vocabulary (which cost
    ~6 ms per row per step at 49k tokens); the rare wider rows take the full sort.
    """
    probs = logits.softmax(dim=-1)
    top_probs, top_index = probs.topk(min(probe, logits.shape[-1]), dim=-1)  # descending
    mass_before = top_probs.cumsum(dim=-1) - top_probs
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(
        1, top_index, mass_before < top_p[:, None])
    keep |= (top_p >= 1)[:, None]  # no nucleus: the float cumsum must not cut the tail
    wide = ((top_probs.sum(dim=-1) < top_p) & (top_p < 1)).nonzero().flatten()
    if len(wide):  # the nucleus reaches past the probe: rank the whole vocabulary
        sorted_probs, order = probs[wide].sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep[wide] = torch.zeros_like(before, dtype=torch.bool).scatter(
            1, order, before < top_p[wide, None])
    return logits.masked_fill(~keep, NEG_INF)


def choose_tokens(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Greedy where ``temperature == 0``, else temperature + top-p sampling with each row's
    own generator (so a row's output does not depend on who else is in the batch)."""
    chosen = scores.argmax(dim=-1)
    sampled_rows = (temperature > 0).nonzero().flatten().tolist()
    if not sampled_rows:
        return chosen
    rows = torch.tensor(sampled_rows, device=scores.device)
    filtered = top_p_filter(scores[rows].float() / temperature[rows, None], top_p[rows])
    for i, row in enumerate(sampled_rows):
        # draw among the surviving tokens only: the same distribution as over the whole
        # vocabulary, without a 49k-wide multinomial per row
        survivors = filtered[i].isfinite().nonzero().flatten()
        probs = filtered[i, survivors].softmax(dim=-1)
        chosen[row] = survivors[torch.multinomial(probs, 1, generator=generators[row])[0]]
    return chosen


# --- Orchestration (MoPE, Zhou et al. 2024): mixing frozen experts, Personalized Soups, REBEL ---


def mixture_log_probs(expert_log_probs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``log sum_i alpha_i p_i`` over the experts (dim 1): MoPE's probability-space mixture.

    ``expert_log_probs`` is ``[B, n, ...]`` (each expert's log-softmax over the vocabulary,
    or log-probs already gathered at chosen tokens), ``alpha`` is ``[B, n]`` on the simplex.
    Computed as a logsumexp so no probability underflows; an expert with weight 0 drops out
    exactly (``log 0 = -inf``). The result is a log-probability: greedy is its argmax and
    sampling at temperature 1 samples the mixture itself.

    >>> lp = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]).log()
    >>> mixture_log_probs(lp, torch.tensor([[0.5, 0.5]])).exp().tolist()
    [[0.75, 0.25]]
    """
    shape = (*alpha.shape, *([1] * (expert_log_probs.dim() - alpha.dim())))
    return torch.logsumexp(alpha.log().view(shape) + expert_log_probs, dim=1)


def logit_mixture(expert_logits: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``sum_i alpha_i z_i``: the MOD-style logit-space mixture (the ablation MoPE beats).

    An expert with weight 0 contributes nothing, even where its logit is ``-inf``
    (repetition control), instead of the ``0 * -inf = nan`` a plain product would give.
    """
    weights = alpha[..., None]
    return torch.where(weights > 0, weights * expert_logits, 0.0).sum(dim=1)


def average_parameters(parameters: Sequence[torch.Tensor],
                       weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Personalized Soups: ``sum_i w_i theta_i``, one weight per expert's copy of the same
    parameter (a head's ``W`` or ``b``, a LoRA matrix); uniform weights are the Soups
    baseline."""
    w = torch.as_tensor(weights, dtype=parameters[0].dtype, device=parameters[0].device)
    if len(w) != len(parameters):
        raise ValueError("one weight per parameter tensor")
    return torch.einsum("n,n...->...", w, torch.stack(list(parameters)))


def weight_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_i alpha_i log alpha_i`` of each row of mixing weights (``0 log 0 = 0``):
    0 for one expert, ``log n`` for uniform over n."""
    return -torch.where(alpha > 0, alpha * alpha.log(), 0.0).sum(dim=-1)


def rebel_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_new_other: torch.Tensor,
               logp_old_other: torch.Tensor, reward: torch.Tensor, reward_other: torch.Tensor,
               eta: float) -> torch.Tensor:
    """REBEL (Gao et al. 2024): regress the difference of two responses' log-ratios onto
    their reward difference, mean over pairs:

    ``((log pi_new(y)/pi_old(y) - log pi_new(y')/pi_old(y')) / eta - (r(y) - r(y')))^2``

    Sequence log-probs in, so the policy's normaliser never appears; ``eta`` sets how far
    one update moves (a log-ratio gap of ``eta * (r - r')`` is the fixed point).
    """
    ratio_gap = (logp_new - logp_old) - (logp_new_other - logp_old_other)
    return (ratio_gap / eta - (reward - reward_other)).pow(2).mean()
