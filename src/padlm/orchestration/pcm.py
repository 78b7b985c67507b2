"""The Preference Control Model (PCM): per-token mixing weights over a request's experts.

Inputs at each position: the experts' final hidden states there (the instruction and the
partial response as the backbone reads them) and MiniLM embeddings of the request's
preference text and of each expert's own text. Output: a softmax over the row's experts.

``alpha_j = softmax_j( tanh(A norm(h) + B q) . (C e_j) )`` with ``h`` the mean of the row's
lanes' hidden states, ``q`` the request's embedding and ``e_j`` expert ``j``'s. Why the mean of
the lanes: every lane reads the same instruction and response, each through one expert's
preference text, so the mean costs no extra forward (a preference-free lane would) and does
not depend on the order the preferences were written in; the request itself enters through
``q``. Because experts enter through their text embeddings, not a fixed output slot, one PCM
takes any subset of its experts in any order, and free-text wording gets weights too. ``C``
starts at zero, so an untrained PCM is exactly the uniform mixture: RL starts from the
``mix:uniform`` baseline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from padlm.atomic import write_json_atomic
from padlm.core import guidance
from padlm.errors import PadlmError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pcm.safetensors"
EMBEDDING_SIZE = 384  # all-MiniLM-L6-v2


@dataclass
class PCMConfig:
    hidden_size: int
    width: int = 64
    embedding_size: int = EMBEDDING_SIZE
    training: dict[str, Any] = field(default_factory=dict)


class PreferenceControlModel(nn.Module):
    """Small network: ``(hidden, request embedding, expert embeddings) -> alpha``."""

    def __init__(self, config: PCMConfig) -> None:
        super().__init__()
        self.config = config
        self.state = nn.Linear(config.hidden_size, config.width)
        self.request = nn.Linear(config.embedding_size, config.width, bias=False)
        self.expert = nn.Linear(config.embedding_size, config.width, bias=False)
        nn.init.zeros_(self.expert.weight)  # untrained = uniform weights

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, hidden: torch.Tensor, request: torch.Tensor, experts: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """``hidden [N, L, d]`` (lanes), ``request [N, e]``, ``experts [N, L, e]``, ``valid
        [N, L]`` (False for a repeated filler lane) -> ``alpha [N, L]`` (0 where invalid)."""
        weights = valid.to(hidden.dtype)[..., None]
        mean = (hidden * weights).sum(1) / weights.sum(1)
        state = nn.functional.layer_norm(mean.float(), (mean.shape[-1],))
        query = torch.tanh(self.state(state) + self.request(request))  # [N, w]
        scores = torch.einsum("nw,nlw->nl", query, self.expert(experts))
        return guidance.masked_log_softmax(scores, valid).exp()

    def write(self, directory: Path) -> None:
        save_file({k: v.detach().float().cpu().contiguous()
                   for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))
        write_json_atomic(directory / CONFIG_NAME, asdict(self.config))

    @classmethod
    def load(cls, directory: Path) -> PreferenceControlModel:
        try:
            config = PCMConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise PadlmError(f"{directory / CONFIG_NAME} is not a valid PCM config: "
                             f"{error}") from None
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()
