"""Surface-text judges: readability, length, sentiment. Cheap, deterministic, offline.

They measure what the P-Soups preferences ask for in the most literal way, which is exactly
why they are useful as directional judges: a method that claims to make text "easier to
understand" must at least lower its reading grade.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_WORD = re.compile(r"[A-Za-z0-9']+")

# A short list of English function words: "content words" are the rest.
_STOPWORDS_TEXT = """
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself
just me more most my myself no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves also may might must shall
let us s t ll re ve d m
"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes); punctuation is dropped."""
    return [w.lower() for w in _WORD.findall(text)]


@lru_cache(maxsize=1)
def _textstat():
    # Imported here to silence its warning: textstat 0.7.3 imports pkg_resources
    # (setuptools < 81) and warns about it; newer textstat needs NLTK's cmudict, which
    # cannot be downloaded offline.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import textstat
    textstat.set_lang("en")
    return textstat


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    """One analyzer per process: building it reads VADER's lexicon."""
    return SentimentIntensityAnalyzer()


def flesch_kincaid_grade(text: str) -> float:
    """US school grade needed to read ``text`` (higher = harder). 0 for empty text."""
    return float(_textstat().flesch_kincaid_grade(text)) if words(text) else 0.0


def dale_chall(text: str) -> float:
    """Dale-Chall readability: share of words outside 3000 familiar ones (higher = harder)."""
    return float(_textstat().dale_chall_readability_score(text)) if words(text) else 0.0


def word_count(text: str) -> float:
    return float(len(words(text)))


def content_words(text: str) -> float:
    """Number of distinct non-stopword words: length that carries information."""
    return float(len({w for w in words(text) if w not in STOPWORDS and not w.isdigit()}))


def vader_compound(text: str) -> float:
    """VADER compound sentiment in [-1, 1] (friendly/positive > 0 > hostile/negative)."""
    return float(_vader().polarity_scores(text)["compound"]) if text.strip() else 0.0



_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")


def list_lines(text: str) -> float:
    """Share of the non-empty lines that are list items (``- x``, ``* x``, ``\u2022 x``,
    ``1. x``, ``2) x``): 1 for a bulleted answer, 0 for prose."""
    lines = [line for line in text.splitlines() if line.strip()]
    return sum(bool(_LIST_ITEM.match(line)) for line in lines) / len(lines) if lines else 0.0


def exclamations(text: str) -> float:
    """Exclamation marks per 100 words: how energetic the answer sounds on its surface."""
    count = len(words(text))
    return 100.0 * text.count("!") / count if count else 0.0
