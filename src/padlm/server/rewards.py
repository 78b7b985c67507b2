"""Per-token personalized rewards for the playground's token view, without touching the core.

A :class:`RecordingStrategy` wraps a token-level strategy and keeps the last model outputs the
decode loop handed it. After ``DecodeBatch.step()`` the server turns those outputs and the
chosen tokens into PAD's token reward ``r(a) = log softmax_K(z_R)[a] - log softmax_K(z_b)[a]``
(:func:`chosen_token_reward`), i.e. exactly the term PAD adds to the base logits, for every
row, whichever strategy decoded it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from padlm import guidance
from padlm.decoding import Request, Row
from padlm.kvstream import StreamOutput
from padlm.persrm import PersonalizedRewardModel
from padlm.strategies import DEFAULT_TOP_K, PadStrategy


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


class RecordingStrategy:
    """Delegates to a strategy and remembers the outputs of the last ``scores`` call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.streams = inner.streams
        self.last: list[StreamOutput] | None = None

    def contexts(self, request: Request) -> list[list[list[int]]]:
        return self.inner.contexts(request)

    def scores(self, outputs: list[StreamOutput], rows: Sequence[Row], process):
        self.last = outputs
        return self.inner.scores(outputs, rows, process)


class TokenRewards:
    """Computes the reward of the tokens a recorded step chose (``None`` if it cannot)."""

    def __init__(self, persrm: PersonalizedRewardModel, lm_head: torch.Tensor) -> None:
        self.persrm = persrm
        self.lm_head = lm_head

    @torch.inference_mode()
    def __call__(self, strategy: RecordingStrategy, rows: Sequence[Row],
                 tokens: Sequence[int]) -> list[float] | None:
        if strategy.last is None or not rows:
            return None
        out = strategy.last[0]
        if isinstance(strategy.inner, PadStrategy):
            hidden = out.hidden[:, strategy.inner.persrm_lane]
            reference = out.logits[:, strategy.inner.reference_lane]
        elif self.persrm.shares_backbone and not self.persrm.config.unconditioned:
            hidden = out.hidden[:, 0]  # the head reads the hidden state this stream saw
            reference = out.logits[:, 0]
        else:
            return None  # this stream has no PersRM lane or no preference-free lane
        k = torch.tensor([row.config.top_k or self.persrm.config.top_k or DEFAULT_TOP_K
                          for row in rows])
        rewards = chosen_token_reward(
            out.logits[:, 0], lambda c: self.persrm.reward_logits(hidden, self.lm_head, c),
            torch.tensor(list(tokens)), k, reference,
        )
        return [float(r) for r in rewards]
