"""Offline, deterministic judges of generated text, and which way each preference wants them.

Every judge is a :class:`Judge`: a name, one line on what it measures, a batched scoring
function ``(prompts, responses) -> list[float]`` and ``directions``: +1 when a preference
wants the score higher, -1 lower. The P-Soups preferences (Jang et al. 2023) map to:

========  ==================================================  =============================
pref      wants                                               primary judge (direction)
========  ==================================================  =============================
P1A/P1B   elementary-school / PhD-level text                  ``expertise`` (FK grade, -/+)
P2A/P2B   concise / very informative                          ``informativeness`` (words -/+)
P3A/P3B   friendly and funny / unfriendly                     ``friendliness`` (VADER +/-)
========  ==================================================  =============================

Two free-text axes of the teacher data have a surface rule too: ``list_lines`` (share of
list-item lines; ``bullets`` +, ``prose`` -) and ``exclamations`` (per 100 words;
``enthusiastic`` +, ``calm`` -): what ``padlm eval feedback``'s simulated users with
free-text tastes choose by. ``relevance`` (helpfulness guard) and ``harmlessness`` have no
P-Soups direction; they are guards, and directional for PAD's own ``helpful``/``harmless``
dimensions.

>>> JUDGES["friendliness"].score(["q"], ["I love this, thank you so much!"])[0] > 0.5
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from padlm.errors import PadlmError
from padlm.judges import text as _text
from padlm.judges.embedding import relevance as _relevance
from padlm.judges.harmlessness import default_judge as _harmlessness_judge

ScoreFn = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass(frozen=True)
class Judge:
    name: str
    measures: str
    fn: ScoreFn = field(repr=False)
    directions: dict[str, int] = field(default_factory=dict)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        return self.fn(list(prompts), list(responses)) if responses else []


def _per_text(fn: Callable[[str], float]) -> ScoreFn:
    return lambda prompts, responses: [fn(r) for r in responses]


def _harmlessness(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return _harmlessness_judge().score(prompts, responses)


JUDGES: dict[str, Judge] = {j.name: j for j in (
    Judge("expertise", "Flesch-Kincaid grade level (textstat): school years needed to read it",
          _per_text(_text.flesch_kincaid_grade), {"P1A": -1, "P1B": +1}),
    Judge("dale_chall", "Dale-Chall readability score (textstat): share of unfamiliar words",
          _per_text(_text.dale_chall), {"P1A": -1, "P1B": +1}),
    Judge("informativeness", "word count of the response",
          _per_text(_text.word_count), {"P2A": -1, "P2B": +1}),
    Judge("content_words", "number of distinct content (non-stopword) words",
          _per_text(_text.content_words), {"P2A": -1, "P2B": +1}),
    Judge("friendliness", "VADER compound sentiment in [-1, 1]",
          _per_text(_text.vader_compound), {"P3A": +1, "P3B": -1, "humor": +1}),
    Judge("list_lines", "share of non-empty lines that are list items",
          _per_text(_text.list_lines), {"bullets": +1, "prose": -1}),
    Judge("exclamations", "exclamation marks per 100 words",
          _per_text(_text.exclamations), {"enthusiastic": +1, "calm": -1}),
    Judge("relevance", "cosine(prompt, response) of all-MiniLM-L6-v2 embeddings",
          _relevance, {"helpful": +1}),
    Judge("harmlessness", "Bradley-Terry score of a head trained on HH-RLHF harmless pairs",
          _harmlessness, {"harmless": +1}),
)}

# The judge whose direction decides a win for each preset preference.
PRIMARY: dict[str, str] = {"P1A": "expertise", "P1B": "expertise",
                           "P2A": "informativeness", "P2B": "informativeness",
                           "P3A": "friendliness", "P3B": "friendliness",
                           "harmless": "harmlessness", "helpful": "relevance",
                           "humor": "friendliness", "bullets": "list_lines",
                           "prose": "list_lines", "enthusiastic": "exclamations",
                           "calm": "exclamations"}


def get_judge(name: str) -> Judge:
    if name not in JUDGES:
        raise PadlmError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    return JUDGES[name]


def parse_direction(spec: str) -> tuple[str, int]:
    """``"friendliness:+"`` -> ``("friendliness", 1)``; ``"expertise:-"`` -> ``(..., -1)``."""
    name, sep, sign = spec.strip().rpartition(":")
    if not sep or sign not in {"+", "-"}:
        raise PadlmError(f"judge direction {spec!r} must look like NAME:+ or NAME:-")
    get_judge(name)
    return name, 1 if sign == "+" else -1


def primary_direction(preference_id: str) -> tuple[str, int]:
    """The judge and sign that decide a win for a preset preference id."""
    if preference_id not in PRIMARY:
        raise PadlmError(f"no judge direction is known for {preference_id!r}; name one with "
                         "--judge NAME:+ or NAME:-")
    name = PRIMARY[preference_id]
    return name, JUDGES[name].directions[preference_id]


__all__ = ["JUDGES", "PRIMARY", "Judge", "get_judge", "parse_direction", "primary_direction"]
