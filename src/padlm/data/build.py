"""``padlm data build``: multi-preference pairs made offline by contrastive preference prompting.

For a prompt ``x`` and an opposed pair ``(p_A, p_B)`` the base model samples ``y_A`` prompted
with ``p_A`` and ``y_B`` prompted with ``p_B``; the build emits ``(x, p_A): y_A > y_B`` and the
mirror ``(x, p_B): y_B > y_A``. The P-Soups axes are P1A/P1B, P2A/P2B, P3A/P3B; PAD's
``helpful`` and ``humor`` are contrasted with an opposite text (whose mirror rows are kept as
extra preference texts); ``harmless`` comes from the real human pairs of HH-RLHF.

Generation may use a stronger instruction than the preference text (the 135M model ignores a
mild one); the rows always carry the preference text itself, which is what the PersRM is
trained and evaluated with. Labels never come from the evaluation judges (readability,
length, sentiment, relevance): the only filters here drop degenerate pairs, and the trainer's
self-consistency filter uses the base model's own likelihoods.

The output is append-only JSONL keyed by ``(prompt id, dimension)``; a ``.done`` sidecar also
records keys whose pair was dropped, so an interrupted build resumes where it stopped.
Sampling uses one seed per (build seed, prompt id, preference): the same rows whatever the
batch composition or resume history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from padlm.data.hh import harmless_rows
from padlm.data.pools import PoolPrompt, hh_first_turn_prompts, self_instruct_prompts
from padlm.data.schema import PreferenceRow
from padlm.decoding import GenerationConfig
from padlm.errors import PadlmError
from padlm.preferences import PAD_DIMENSIONS, PSOUPS

log = logging.getLogger(__name__)

# Extra instructions used ONLY while sampling, to make the small model follow the axis.
STRONGER = {
    "P1A": "Use only short, simple, everyday words and short sentences, as if talking to a "
           "seven-year-old.",
    "P1B": "Use advanced technical vocabulary, precise jargon and long, complex sentences.",
    "P2A": "Answer in one or two short sentences only.",
    "P2B": "Write a long, detailed answer that explains the background step by step.",
    "P3A": "Be warm and cheerful, joke around and use playful, funny language.",
    "P3B": "Be rude, cold and dismissive, and show that you are annoyed.",
    "helpful": "Give a complete, correct and specific answer.",
    "unhelpful": "Do not really answer: stay vague and change the subject.",
    "humor": "Make a joke or a funny remark in your answer.",
    "serious": "Stay strictly factual; no jokes.",
}
OPPOSITE_TEXTS = {
    "unhelpful": "Generate a response that is unhelpful: vague, evasive and missing the point.",
    "serious": "Generate a response that is serious, dry and formal, with no jokes at all.",
}
TEXTS = {**PSOUPS, **PAD_DIMENSIONS, **OPPOSITE_TEXTS}


@dataclass(frozen=True)
class Contrast:
    """An opposed pair of preference ids; both directions are emitted as rows."""

    name: str
    a: str
    b: str


CONTRASTS = {
    "P1": Contrast("P1", "P1A", "P1B"),
    "P2": Contrast("P2", "P2A", "P2B"),
    "P3": Contrast("P3", "P3A", "P3B"),
    "helpful": Contrast("helpful", "helpful", "unhelpful"),
    "humor": Contrast("humor", "humor", "serious"),
}
DEFAULT_AXES = ("P1", "P2", "P3", "helpful", "humor", "harmless")


@dataclass
class BuildConfig:
    out: Path
    pool_dir: Path
    limit: int | None = None  # prompts to generate for (None: the whole pool)
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 80
    temperature: float = 0.7
    top_p: float = 0.9
    no_repeat_ngram_size: int = 3
    axes: tuple[str, ...] = DEFAULT_AXES
    harmless_limit: int = 400
    hh_prompt_share: float = 0.3  # share of generation prompts drawn from HH first turns
    stats: dict = field(default_factory=dict)


def row_seed(seed: int, prompt_id: str, preference_id: str) -> int:
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{preference_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def generation_text(preference_id: str) -> str:
    return f"{TEXTS[preference_id]} {STRONGER[preference_id]}"


_SENTENCE_END = re.compile(r"[.!?)\]\"'](?=\s)|\n")


def clean_response(text: str, cut: bool) -> str:
    """Strip; a response cut by the token limit is trimmed to its last sentence end (or, if
    that loses too much, its last whole word) so no pair ends mid-word."""
    text = text.strip()
    if not cut or not text:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text + " ")]
    if ends and ends[-1] >= 0.4 * len(text):
        return text[:ends[-1]].strip()
    space = text.rfind(" ")
    return text[:space].rstrip(" ,;:-") if space > 0 else ""


def is_degenerate(text: str) -> str | None:
    """Why a response is unusable (empty, too short, looping), else None."""
    words = text.split()
    if len(words) < 3:
        return "empty or too short"
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    if grams and grams.most_common(1)[0][1] >= 3:
        return "repetition loop"
    return None


def generation_pool(config: BuildConfig) -> list[PoolPrompt]:
    """Self-Instruct prompts and HH first turns, shuffled with the seed, interleaved so any
    prefix (``--limit``) has the requested share of each."""
    rng = random.Random(config.seed)
    instruct = self_instruct_prompts(config.pool_dir)
    hh = hh_first_turn_prompts(config.pool_dir)
    rng.shuffle(instruct)
    rng.shuffle(hh)
    pool, i, j = [], 0, 0
    while i < len(instruct) or j < len(hh):
        take_hh = j < len(hh) and (i >= len(instruct)
                                   or (j + 1) / (i + j + 1) <= config.hh_prompt_share)
        if take_hh:
            pool.append(hh[j])
            j += 1
        else:
            pool.append(instruct[i])
            i += 1
    return pool[:config.limit] if config.limit is not None else pool


def done_keys(config: BuildConfig) -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    sidecar = config.out.with_name(config.out.name + ".done")
    if sidecar.exists():
        for line in sidecar.read_text().splitlines():
            if line.strip():
                prompt_id, dimension = json.loads(line)
                keys.add((prompt_id, dimension))
    return keys


class _Writer:
    """Appends rows, then their keys to the ``.done`` sidecar (flushed per chunk): a crash
    between the two at worst regenerates a chunk whose rows are then written twice, and
    duplicates are removed on load by key."""

    def __init__(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.rows = out.open("a", encoding="utf-8")
        self.done = out.with_name(out.name + ".done").open("a", encoding="utf-8")

    def write(self, rows: Sequence[PreferenceRow], keys: Sequence[tuple[str, str]]) -> None:
        for row in rows:
            self.rows.write(row.to_json() + "\n")
        self.rows.flush()
        for key in keys:
            self.done.write(json.dumps(list(key)) + "\n")
        self.done.flush()

    def close(self) -> None:
        self.rows.close()
        self.done.close()


def build_dataset(engine, config: BuildConfig,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) a build; returns the statistics it also logs."""
    began = time.perf_counter()
    for axis in config.axes:
        if axis not in CONTRASTS and axis != "harmless":
            raise PadlmError(f"unknown axis {axis!r}; choose from {', '.join(DEFAULT_AXES)}")
    keys = done_keys(config)
    writer = _Writer(config.out)
    counts: Counter = Counter()
    dropped: Counter = Counter()
    try:
        if "harmless" in config.axes and ("hh-rlhf", "harmless") not in keys:
            rows = harmless_rows(config.pool_dir)
            random.Random(config.seed).shuffle(rows)
            rows = rows[:config.harmless_limit]
            for index, row in enumerate(rows):
                row.meta = {"key": [f"hh-rlhf:{index}", "harmless"]}
            writer.write(rows, [("hh-rlhf", "harmless")])
            counts["harmless"] += len(rows)
        contrasts = [CONTRASTS[a] for a in config.axes if a in CONTRASTS]
        jobs = [(prompt, contrast) for prompt in generation_pool(config)
                for contrast in contrasts if (prompt.id, contrast.a) not in keys]
        per_chunk = max(1, config.batch_size // 2)
        total_tokens = 0
        for start in range(0, len(jobs), per_chunk):
            chunk = jobs[start:start + per_chunk]
            requests = []
            for prompt, contrast in chunk:
                for pid in (contrast.a, contrast.b):
                    generation = GenerationConfig(
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        top_p=config.top_p, seed=row_seed(config.seed, prompt.id, pid),
                        no_repeat_ngram_size=config.no_repeat_ngram_size,
                    )
                    requests.append(engine.request(prompt.prompt, generation_text(pid),
                                                   generation))
            outputs = engine.batch("prompt").run(requests)  # rows keep their own seeds
            rows, done = [], []
            for index, (prompt, contrast) in enumerate(chunk):
                out_a, out_b = outputs[2 * index], outputs[2 * index + 1]
                total_tokens += len(out_a.tokens) + len(out_b.tokens)
                y_a = clean_response(out_a.text, out_a.finish_reason == "length")
                y_b = clean_response(out_b.text, out_b.finish_reason == "length")
                reason = is_degenerate(y_a) or is_degenerate(y_b) or (
                    "identical" if y_a == y_b else None)
                done += [(prompt.id, contrast.a), (prompt.id, contrast.b)]
                if reason:
                    dropped[f"{contrast.name}: {reason}"] += 1
                    continue
                for pid, chosen, rejected in ((contrast.a, y_a, y_b), (contrast.b, y_b, y_a)):
                    rows.append(PreferenceRow(
                        prompt=prompt.prompt, preference=TEXTS[pid], chosen=chosen,
                        rejected=rejected, dimension=pid, source=f"contrastive:{prompt.source}",
                        meta={"key": [prompt.id, pid], "mirror": [prompt.id, _other(contrast,
                                                                                     pid)],
                              "axis": contrast.name},
                    ))
                    counts[pid] += 1
            writer.write(rows, done)
            if progress is not None:
                progress(len(chunk), len(jobs))
        elapsed = time.perf_counter() - began
        stats = {"seconds": round(elapsed, 1), "rows_written": dict(counts),
                 "pairs_dropped": dict(dropped), "generated_tokens": total_tokens,
                 "tokens_per_second": round(total_tokens / max(elapsed, 1e-9), 1)}
        log.info("build finished in %.0f s: %s", elapsed, stats)
        return stats
    finally:
        writer.close()


def _other(contrast: Contrast, pid: str) -> str:
    return contrast.b if pid == contrast.a else contrast.a
