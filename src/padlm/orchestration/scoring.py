"""The ``dimensions`` sequence scorer of ARGS and best-of-n: the per-dimension reward models
shipped for the PCM, scoring whole responses for the preset ids a request names."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from padlm.core.decoding import Request
from padlm.core.models import LoadedModel
from padlm.core.persrm import PersonalizedRewardModel, tensor_fingerprint
from padlm.core.preferences import Preference
from padlm.core.strategies import Scored, SequenceScorer
from padlm.errors import PadlmError
from padlm.orchestration.rewards import DimensionRewards, shipped_rewards_dir

# ARGS's w with the dimension rewards. Their score of a growing response moves little per
# token (one token shifts a MiniLM embedding slightly): on the default model (4 Koala prompts
# x P1A, P2B, P3B, P1B+P2A+P3A, 24 steps, 378 row-steps) the median spread (std) of R over a
# step's 10 candidates was 0.047, the proposal logits' 1.44, so w = 30 would give the reward
# the base model's say. Measured on two prompts x P1A, P3B (48 tokens): w = 10 raises the
# responses' R over preference prompting (P1A -0.26, -0.05 -> -0.04, 0.67) and stays fluent;
# w = 30 starts to loop and clip ("The town has a big problem." x3, "Bureaucrism."), w = 100
# is degenerate. ``--weight`` sets another.
DIMENSION_WEIGHT = 10.0


class DimensionScorer(SequenceScorer):
    """The per-dimension Bradley-Terry reward models shipped for the PCM
    (:mod:`padlm.orchestration.rewards`): ``R(x, y) = mean_{i requested} r_i(x, y)``, ``x``
    the instruction, ``y`` the response text, ``i`` the request's P-Soups preset ids.

    Independent of the PersRM (MiniLM embeddings and a linear head per dimension, fitted on
    the preference pairs), and not an evaluation judge either. Only preset preferences have
    rewards: free text is refused (see :meth:`check`). Each call embeds its responses and
    their distinct instructions in ONE encoder call.
    """

    name = "dimensions"
    default_weight = DIMENSION_WEIGHT

    def __init__(self, tokenizer, rewards: DimensionRewards | None = None) -> None:
        self.tokenizer = tokenizer
        self.rewards = rewards or DimensionRewards.load(shipped_rewards_dir())

    def fingerprint(self) -> str:
        dimensions = self.rewards.dimensions
        return "dimensions-" + tensor_fingerprint(
            f"{','.join(dimensions)};w={self.default_weight}",
            [torch.stack([self.rewards.weights[d].float() for d in dimensions])])

    def dimensions(self, preference: Preference) -> list[str]:
        """The request's dimensions, or a refusal naming the preference and the
        alternative."""
        if not preference:
            raise PadlmError(
                f"the dimension rewards that score args and best-of-n need a preference of "
                f"preset ids ({', '.join(self.rewards.dimensions)}); this request has none",
                param="preference")
        ids = preference.ids
        if ids is None:
            text = preference.text
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise PadlmError(
                f"the dimension rewards that score args and best-of-n cover the preset ids "
                f"{', '.join(self.rewards.dimensions)}, not the free-text preference "
                f"{shown!r}: use preset ids, or --scorer persrm (the PersRM's own reward, "
                f"which makes args PAD's reward searched another way)", param="preference")
        missing = [i for i in ids if i not in self.rewards.dimensions]
        if missing:
            raise PadlmError(
                f"no dimension reward for {', '.join(missing)} (they cover "
                f"{', '.join(self.rewards.dimensions)}): use --scorer persrm",
                param="preference")
        return list(dict.fromkeys(ids))

    def check(self, request: Request) -> None:
        self.dimensions(request.preference)

    def __call__(self, items: Sequence[Scored]) -> torch.Tensor:
        responses = self.tokenizer.batch_decode([list(item.response) for item in items],
                                                skip_special_tokens=True)
        scores = self.rewards.scores([item.request.prompt for item in items], responses)
        masks = {}
        for preference in {item.request.preference for item in items}:
            requested = self.dimensions(preference)
            masks[preference] = [d in requested for d in self.rewards.dimensions]
        mask = torch.tensor([masks[item.request.preference] for item in items],
                            dtype=scores.dtype)
        return (scores * mask).sum(-1) / mask.sum(-1)


def dimension_scorer(lm: LoadedModel, persrm: PersonalizedRewardModel) -> DimensionScorer:
    """The registry's factory (``--scorer dimensions``): independent of the PersRM."""
    return DimensionScorer(lm.tokenizer)
