"""Per-token personalized rewards for the playground's token view, without touching the core.

After ``DecodeBatch.step()`` the server turns the outputs that step scored
(``DecodeBatch.last_outputs``) and the chosen tokens into PAD's token reward
``r(a) = log softmax_K(z_R)[a] - log softmax_K(z_b)[a]``
(:func:`chosen_token_reward`), i.e. exactly the term PAD adds to the base logits, for every
row, whichever strategy decoded it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from padlm.core import guidance
from padlm.core.decoding import DecodeBatch, Row
from padlm.core.persrm import PersonalizedRewardModel
from padlm.core.strategies import DEFAULT_TOP_K


def chosen_token_reward(
    base_logits: torch.Tensor,
    reward_logits: Callable[[torch.Tensor], torch.Tensor],
    chosen: torch.Tensor,
    k: torch.Tensor,
    reference_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """PAD's token reward of each row's chosen token, over the base top-``k[b]`` candidates
    plus the chosen token itself (a sampled token may lie outside the top-k).

    ``reward_logits(candidates [N, C]) -> [N, C]`` gives the PersRM logits at those tokens;
    ``reference_logits`` is the reward's reference (default: the base logits themselves).

    >>> base = torch.tensor([[2.0, 1.0, 0.0]])
    >>> same = lambda c: base.gather(1, c)      # identity PersRM: zero reward
    >>> chosen_token_reward(base, same, torch.tensor([0]), torch.tensor([2])).tolist()
    [0.0]
    """
    candidates, valid = guidance.top_k_candidates(base_logits, k)
    chosen = chosen.to(candidates.device)
    in_top = ((candidates == chosen[:, None]) & valid).any(dim=-1)
    candidates = torch.cat([candidates, chosen[:, None]], dim=1)
    valid = torch.cat([valid, ~in_top[:, None]], dim=1)
    reference = base_logits if reference_logits is None else reference_logits
    reward = guidance.pad_token_reward(reference.gather(1, candidates),
                                       reward_logits(candidates), valid)
    at_chosen = (candidates == chosen[:, None]) & valid
    return (reward * at_chosen).sum(dim=-1)


class TokenRewards:
    """Computes the reward of the tokens a recorded step chose (``None`` if it cannot)."""

    def __init__(self, persrm: PersonalizedRewardModel, lm_head: torch.Tensor) -> None:
        self.persrm = persrm
        self.lm_head = lm_head

    @torch.inference_mode()
    def __call__(self, batch: DecodeBatch, rows: Sequence[Row],
                 tokens: Sequence[int]) -> list[float] | None:
        if batch.last_outputs is None or not rows:
            return None
        out = batch.last_outputs[0]
        if out.logits is None:
            return None  # a stream that makes no base logits (head experts, soups)
        lanes = [self._lanes(batch, row) for row in rows]
        if any(lane is None for lane in lanes):
            return None  # this stream has no PersRM lane or no preference-free lane
        index = torch.arange(len(rows), device=out.hidden.device)
        hidden = out.hidden[index, torch.tensor([lane[0] for lane in lanes], device=index.device)]
        reference = out.logits[index, torch.tensor([lane[1] for lane in lanes],
                                                   device=index.device)]
        k = torch.tensor([row.config.top_k or self.persrm.config.top_k or DEFAULT_TOP_K
                          for row in rows], device=hidden.device)
        rewards = chosen_token_reward(
            out.logits[:, 0], lambda c: self.persrm.reward_logits(hidden, self.lm_head, c),
            torch.tensor(list(tokens), device=hidden.device), k, reference,
        )
        return [float(r) for r in rewards]

    def _lanes(self, batch: DecodeBatch, row: Row) -> tuple[int, int] | None:
        """A row's (PersRM lane, reference lane): its strategy's, for the row's reward
        reference; on a shared backbone whose reference is the stream's own context, lane 0."""
        lanes = batch.strategy.reward_lanes(row.state)
        if lanes is None and self.persrm.shares_backbone and self.persrm.reference == "base":
            return 0, 0  # the head reads the hidden state this stream saw
        return lanes
