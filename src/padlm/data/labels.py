"""``padlm data label-check``: are a sampler's pairs labelled the right way round, per axis?

Before hours of sampling, a few prompts per axis show whether the teacher's ``A`` response
really is more ``A`` than its ``B`` response, and which mode (sampling or contrastive
rewriting) gives cleaner pairs. Where a rule measure exists (P1
Flesch-Kincaid grade lower, P2 fewer words, P3 higher VADER; plus list lines, exclamation
marks, hedges and first-person words for four free-text axes) the check reports the
**directional agreement**: the share of prompts whose pair is usable (no refusal, no
degenerate side) and points the right way, so a refusal counts against a mode instead of
flattering it, and the agreement among the usable pairs (what training would see). These
measures only choose a mode; they never label or filter a row.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from padlm.data.axes import AXES
from padlm.data.build import HH_PROMPT_SHARE, MODES, Pair, PairSampler, generation_pool
from padlm.data.samplers import Sampler, SamplingSettings
from padlm.judges.text import flesch_kincaid_grade, vader_compound, word_count, words

_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
HEDGES = frozenset(["might", "may", "perhaps", "possibly", "maybe", "probably", "seems", "seem",
                    "likely", "could", "somewhat", "arguably", "generally", "typically"])
FIRST_PERSON = frozenset(["i", "me", "my", "mine", "myself", "i'm", "i've", "i'd", "i'll"])


def list_lines(text: str) -> float:
    return float(len(_LIST_LINE.findall(text)))


def exclamations(text: str) -> float:
    return float(text.count("!"))


def hedges(text: str) -> float:
    return float(sum(w in HEDGES for w in words(text)))


def first_person(text: str) -> float:
    return float(sum(w in FIRST_PERSON for w in words(text)))


# axis -> (measure, sign): the A side should score higher when the sign is +1
MEASURES: dict[str, tuple[Callable[[str], float], int]] = {
    "P1": (flesch_kincaid_grade, -1),
    "P2": (word_count, -1),
    "P3": (vader_compound, +1),
    "format": (list_lines, +1),
    "energy": (exclamations, +1),
    "confidence": (hedges, -1),
    "voice": (first_person, +1),
}

CHECK_AXES = ("P1", "P2", "P3")  # checked by default: the rule-measured axes


def agrees(pair: Pair) -> bool:
    measure, sign = MEASURES[pair.axis.name]
    return sign * (measure(pair.texts[0]) - measure(pair.texts[1])) > 0


def summarize(pairs: Sequence[Pair]) -> dict:
    """Agreement over every prompt (an unusable pair disagrees), agreement among the usable
    pairs, and the refusal rate of the responses."""
    usable = [p for p in pairs if p.reason is None]
    sampled = [flag for p in pairs if p.sampled for flag in p.refused]
    summary = {"pairs": len(pairs), "usable": len(usable),
               "refusal_rate": round(sum(sampled) / max(len(sampled), 1), 3),
               "dropped": dict(Counter(p.reason for p in pairs if p.reason))}
    if pairs and pairs[0].axis.name in MEASURES:
        right = sum(agrees(p) for p in usable)
        summary["agreement"] = round(right / len(pairs), 3)
        summary["agreement_usable"] = round(right / max(len(usable), 1), 3)
    return summary


def check_sampler(sampler: Sampler, modes: Sequence[str], pool_dir: Path, prompts: int,
                  axes: Sequence[str], seed: int, settings: SamplingSettings,
                  temperature: float, batch_size: int) -> dict:
    """``{"modes": {mode: {axis: summary}}, "tokens": n}`` for one sampler on the first
    ``prompts`` build prompts."""
    pool = generation_pool(pool_dir, seed, HH_PROMPT_SHARE, prompts)
    pairs_from = PairSampler(sampler, seed, settings, temperature)
    result: dict[str, dict[str, dict]] = {}
    for mode in modes:
        jobs = [(prompt, AXES[name], mode) for prompt in pool for name in axes]
        if mode == "rewrite":
            for start in range(0, len(pool), batch_size):
                pairs_from.ensure_neutrals(pool[start:start + batch_size])
        per_chunk = max(1, batch_size // 2)
        pairs = [pair for start in range(0, len(jobs), per_chunk)
                 for pair in pairs_from.pairs(jobs[start:start + per_chunk])]
        result[mode] = {name: summarize([p for p in pairs if p.axis.name == name])
                        for name in axes}
    return {"modes": result, "tokens": pairs_from.tokens}


def choose_modes(by_mode: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Per axis, the mode whose usable pairs point the right way more often: the build drops
    unusable pairs, so their share only costs sampling time, while a wrong-way pair is
    trained on. Ties go to the higher agreement over every prompt (the better yield), then
    to ``sample`` (the cheaper); axes without a measure take the mode most measured axes
    chose."""
    measured = [a for a in AXES if a in MEASURES and all(a in by_mode.get(m, {})
                                                         for m in MODES)]
    chosen = {}
    for axis in measured:
        scores = {m: (by_mode[m][axis]["agreement_usable"], by_mode[m][axis]["agreement"])
                  for m in MODES}
        chosen[axis] = "rewrite" if scores["rewrite"] > scores["sample"] else "sample"
    wins = sum(mode == "rewrite" for mode in chosen.values())
    majority = "rewrite" if wins * 2 > len(chosen) else "sample"
    return {axis: chosen.get(axis, majority) for axis in AXES}
