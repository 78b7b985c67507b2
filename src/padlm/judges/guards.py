"""Degeneration guards: the ways a steered decoder fails while its preference score improves.

- ``rep_n``: share of repeated n-grams in one response, ``1 - |unique n-grams| / |n-grams|``
  (Welleck et al. 2019). Greedy small models loop; a method that loops more is worse.
- ``distinct_n``: ``|unique n-grams| / |n-grams|`` over a *set* of responses (Li et al. 2016).
- ``echo``: the response repeats 6+ consecutive words of the preference text or of PAD's
  prompt template instead of answering (conditioning on a text makes copying it likelier).
- ``loops``: a word n-gram that recurs several times in one response (greedy repetition).
- ``perplexity``: of the response under the base model, given the bare prompt. Very low =
  repetitive, very high = broken text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from padlm.core.kvstream import response_hidden
from padlm.core.prompting import PAD_TEMPLATE, render
from padlm.judges.text import words

ECHO_WORDS = 6
LOOP_WORDS, LOOP_TIMES = 4, 3


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


def loops(text: str, n: int = LOOP_WORDS, times: int = LOOP_TIMES) -> bool:
    """True when one run of ``n`` words (split on white space, as written) occurs ``times``
    or more times in ``text``: the decoder is stuck repeating itself."""
    grams = Counter(ngrams(text.split(), n))
    return bool(grams) and max(grams.values()) >= times


def perplexity(lm, prompts: Sequence[str], responses: Sequence[str],
               batch_size: int = 8) -> list[float]:
    """exp(mean token NLL) of each response under ``lm`` (a ``LoadedModel``) given its bare
    prompt in the chat template, ``batch_size`` rows per forward (the scorer's and the
    training cache's :func:`~padlm.core.kvstream.response_hidden`, then the lm_head on the
    response positions only). NaN for empty responses."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    tokenizer, lm_head = lm.tokenizer, lm.model.get_output_embeddings()
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        contexts = [render(tokenizer, p) for p in prompts[start:start + batch_size]]
        targets = [tokenizer(r, add_special_tokens=False)["input_ids"]
                   for r in responses[start:start + batch_size]]
        for hidden, target in zip(response_hidden(lm.model, contexts, targets), targets,
                                  strict=True):
            if not target:
                out.append(float("nan"))
                continue
            with torch.inference_mode():
                logprobs = torch.log_softmax(lm_head(hidden).float(), -1)
                ids = torch.tensor(target, device=logprobs.device)
                nll = -logprobs[torch.arange(len(target), device=logprobs.device), ids]
            out.append(float(torch.exp(nll.mean())))
    return out
