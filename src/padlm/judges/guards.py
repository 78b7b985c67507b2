"""Degeneration guards: the ways a steered decoder fails while its preference score improves.

- ``rep_n``: share of repeated n-grams in one response, ``1 - |unique n-grams| / |n-grams|``
  (Welleck et al. 2019). Greedy small models loop; a method that loops more is worse.
- ``distinct_n``: ``|unique n-grams| / |n-grams|`` over a *set* of responses (Li et al. 2016).
- ``echo``: the response repeats 6+ consecutive words of the preference text or of PAD's
  prompt template instead of answering (a failure measured in the prototype, DESIGN §5).
- ``perplexity``: of the response under the base model, given the bare prompt. Very low =
  repetitive, very high = broken text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from padlm.judges.text import words
from padlm.prompting import PAD_TEMPLATE, render

ECHO_WORDS = 6


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(text: str, n: int) -> float:
    """Repeated n-gram share of one text (0 = no repeats; 0 when it has no n-gram)."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams across ``texts`` (1 = never repeats itself or others)."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _template_sources(preference: str) -> list[list[str]]:
    fixed = [part for part in PAD_TEMPLATE.replace("{instruction}", "{preference}")
             .split("{preference}") if part.strip()]
    return [words(preference), *(words(part) for part in fixed)]


def echo(text: str, preference: str, min_words: int = ECHO_WORDS) -> bool:
    """True when ``text`` contains ``min_words`` consecutive words of ``preference`` or of the
    fixed parts of PAD's template (case and punctuation ignored)."""
    response = set(ngrams(words(text), min_words))
    if not response:
        return False
    return any(response.intersection(ngrams(source, min_words))
               for source in _template_sources(preference))


@torch.no_grad()
def perplexity(lm, prompts: Sequence[str], responses: Sequence[str],
               batch_size: int = 8) -> list[float]:
    """exp(mean token NLL) of each response under ``lm`` (a ``LoadedModel``) given its bare
    prompt in the chat template; batched with right padding. NaN for empty responses."""
    tokenizer, model = lm.tokenizer, lm.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        contexts, targets = [], []
        for prompt, response in zip(prompts[start:start + batch_size],
                                    responses[start:start + batch_size], strict=True):
            contexts.append(render(tokenizer, prompt))
            targets.append(tokenizer(response, add_special_tokens=False)["input_ids"])
        length = max(len(c) + len(t) for c, t in zip(contexts, targets, strict=True))
        ids = torch.full((len(contexts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for i, (c, t) in enumerate(zip(contexts, targets, strict=True)):
            ids[i, :len(c) + len(t)] = torch.tensor(c + t)
            mask[i, :len(c) + len(t)] = 1
            scored[i, len(c):len(c) + len(t)] = True
        logits = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logprobs.gather(-1, ids[:, 1:, None].to(lm.device)).squeeze(-1).cpu()
        used = scored[:, 1:]
        for i in range(len(contexts)):
            count = int(used[i].sum())
            out.append(float(torch.exp(nll[i][used[i]].mean())) if count else float("nan"))
    return out
