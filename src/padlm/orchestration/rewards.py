"""Per-dimension reward models for the PCM's RL reward, and MoPE's reward on top of them.

One Bradley-Terry head per P-Soups dimension on MiniLM embeddings, ``r_i(x, y) = w_i .
[e(y), e(x) * e(y)]``, fitted on that dimension's preference pairs only (the harmlessness
judge's recipe and code). Deliberately NOT the evaluation judges (readability formulas, word
counts, VADER): a PCM trained on the judge it is scored with learns to game it.

MoPE's reward of a response ``y`` to ``x`` under the requested dimensions ``D`` is
``mean_{i in D} sigmoid(r_i(x, y) - r_i(x, y_ref))``, ``y_ref`` the reference policy's
response (the base model's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from padlm.data.schema import PreferenceRow
from padlm.data.splits import split_rows
from padlm.errors import PadlmError
from padlm.judges.embedding import MiniLMEncoder, default_encoder
from padlm.judges.harmlessness import features, fit_bradley_terry, pairwise_accuracy

WEIGHTS_NAME = "rewards.safetensors"
WEIGHT_DECAY = 1e-2  # held-out accuracy on the P1, P2, P3 pairs: 0.94, 0.65, 0.88


def shipped_rewards_dir() -> Path:
    """Where the package ships the default reward models (beside the default PCM)."""
    return Path(str(resources.files("padlm") / "assets" / "orchestration-default" / "pcm"))


def preference_reward(scores: torch.Tensor, reference: torch.Tensor, requested: torch.Tensor
                      ) -> torch.Tensor:
    """``mean_{i requested} sigmoid(r_i(y) - r_i(y_ref))`` per row: ``scores`` and
    ``reference`` are ``[N, dims]``, ``requested [N, dims]`` marks each row's dimensions."""
    gain = torch.sigmoid(scores - reference) * requested
    return gain.sum(-1) / requested.sum(-1)


def instruction_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """What ``x`` is for a reward model: the prompt, or a dialogue's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


@dataclass
class DimensionRewards:
    """``w_i`` per dimension (``[2 * 384]``) and how well each ranks held-out pairs."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, dict] = field(default_factory=dict)
    encoder: MiniLMEncoder | None = None

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def scores(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor:
        """``[N, dims]``: every dimension's reward of each response. The distinct
        instructions and the responses go through ONE encoder call (ARGS asks for k
        continuations of each row at every step, all with the same instruction)."""
        encoder = self.encoder or default_encoder()
        instructions = [instruction_text(p) for p in prompts]
        distinct = list(dict.fromkeys(instructions))
        embedded = encoder.encode([*distinct, *responses])
        position = {text: i for i, text in enumerate(distinct)}
        x = embedded[[position[text] for text in instructions]]
        weights = torch.stack([self.weights[d].float() for d in self.dimensions])
        return features(x, embedded[len(distinct):]) @ weights.T

    def reward(self, prompts: Sequence, responses: Sequence[str], references: Sequence[str],
               requested: Sequence[Sequence[str]]) -> torch.Tensor:
        """MoPE's reward of each response against its reference, over its dimensions."""
        scores = self.scores([*prompts, *prompts], [*responses, *references])
        mask = torch.tensor([[d in row for d in self.dimensions] for row in requested],
                            dtype=scores.dtype)
        return preference_reward(scores[:len(prompts)], scores[len(prompts):], mask)

    def write(self, directory: Path) -> None:
        save_file({d: w.contiguous() for d, w in self.weights.items()},
                  str(directory / WEIGHTS_NAME))

    @classmethod
    def load(cls, directory: Path, metrics: dict | None = None) -> DimensionRewards:
        return cls(load_file(str(directory / WEIGHTS_NAME)), metrics or {})


def train_rewards(rows: Sequence[PreferenceRow], dimensions: Sequence[str],
                  encoder: MiniLMEncoder | None = None) -> DimensionRewards:
    """Fit one head per dimension on its pairs; held-out accuracy on the prompt-level
    validation split (the same split the PersRM and the experts hold out)."""
    encoder = encoder or default_encoder()
    weights, metrics = {}, {}
    for dimension in dimensions:
        pairs = [row for row in rows if row.dimension == dimension]
        if not pairs:
            raise PadlmError(f"no preference pairs for dimension {dimension}")
        train, held_out = split_rows(pairs)
        x_good, x_bad = _features(encoder, train)
        weights[dimension] = fit_bradley_terry(x_good, x_bad, WEIGHT_DECAY)
        train_accuracy = pairwise_accuracy(weights[dimension], x_good, x_bad)
        metrics[dimension] = {"train_pairs": len(train), "heldout_pairs": len(held_out),
                              "train_accuracy": round(train_accuracy, 4)}
        if held_out:
            metrics[dimension]["heldout_accuracy"] = round(
                pairwise_accuracy(weights[dimension], *_features(encoder, held_out)), 4)
    return DimensionRewards(weights, metrics, encoder)


def _features(encoder: MiniLMEncoder, rows: Sequence[PreferenceRow]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    x = encoder.encode([instruction_text(r.prompt) for r in rows])
    return (features(x, encoder.encode([r.chosen for r in rows])),
            features(x, encoder.encode([r.rejected for r in rows])))
