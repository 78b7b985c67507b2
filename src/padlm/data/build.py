"""``padlm data build``: multi-preference pairs made offline by a sampler (teacher) model.

For a prompt ``x`` and an axis with opposed sides ``(p_A, p_B)`` the build emits
``(x, p_A): y_A > y_B`` and the mirror ``(x, p_B): y_B > y_A``, where ``y_A`` and ``y_B`` come
from one of two modes, chosen per axis:

- ``sample``: the sampler answers ``x`` instructed with ``p_A``, then with ``p_B``;
- ``rewrite`` (contrastive rewriting): the sampler writes one neutral answer, then rewrites it
  toward each side, so the two responses differ in the preference and not in their content.

``harmless`` comes from the real human pairs of HH-RLHF. The sampler may be the base model
itself, a stronger local model or an OpenAI-compatible endpoint (:mod:`padlm.data.samplers`);
every row records which one wrote it. Generation uses a stronger instruction than the
preference text (small models ignore a mild one); rows always carry the preference text
itself, which is what the PersRM is trained and evaluated with. Labels never come from the
evaluation judges: the filters here drop degenerate pairs and refusals only (a refusal would
teach "refuse" as the rude or expert side), and the trainer's self-consistency filter uses the
base model's own likelihoods.

The output is append-only JSONL keyed by ``(prompt id, side)``; a ``.done`` sidecar also
records keys whose pair was dropped (with the reason), a ``.neutral.jsonl`` sidecar keeps the
neutral answers of rewrite mode, so an interrupted build resumes where it stopped. Sampling
uses one seed per (build seed, prompt id, side): the same rows whatever the batch composition
or resume history. ``<out>.build.json`` records every run (command, sampler, modes, time,
tokens/s, refusal rates) and the label check that chose the modes.
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
from datetime import UTC, datetime
from pathlib import Path

from padlm.atomic import write_json_atomic
from padlm.data.axes import (
    AXES,
    DEFAULT_AXES,
    HARMLESS,
    HELD_OUT_AXES,
    SIDES,
    Axis,
    check_axes,
    generation_text,
)
from padlm.data.hh import harmless_rows
from padlm.data.pools import PoolPrompt, hh_first_turn_prompts, self_instruct_prompts
from padlm.data.samplers import Sample, Sampler, SampleRequest, SamplingSettings
from padlm.data.schema import PreferenceRow
from padlm.errors import PadlmError
from padlm.records import JsonlAppender, read_jsonl

log = logging.getLogger(__name__)

MODES = ("sample", "rewrite")
HH_PROMPT_SHARE = 0.3  # share of generation prompts drawn from HH first turns
NEUTRAL_INSTRUCTION = "Answer the request clearly, correctly and helpfully."
NEUTRAL_DROP = "neutral answer refused or degenerate"
REWRITE_REQUEST = (
    "Here is a request and an answer to it.\n\nRequest:\n{prompt}\n\nAnswer:\n{answer}\n\n"
    "Rewrite the answer following this instruction: {goal} Keep every fact correct and "
    "answer the same request. Reply with the rewritten answer only."
)
# the instruction of every rewrite request: the same for all sides of a prompt, so their
# contexts share everything up to the side's goal (the last lines), and an engine with prefix
# caching (vLLM) prefills the request and its neutral answer once for all 30 sides
REWRITE_INSTRUCTION = "You rewrite answers exactly as asked."


@dataclass
class BuildConfig:
    out: Path
    pool_dir: Path
    limit: int | None = None  # prompts to generate for (None: the whole pool)
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    no_repeat_ngram_size: int = 3
    axes: tuple[str, ...] = DEFAULT_AXES
    modes: dict[str, str] = field(default_factory=dict)  # axis -> mode; absent: ``mode``
    mode: str = "sample"
    harmless_limit: int | None = None  # None: every usable HH-RLHF pair
    hh_prompt_share: float = HH_PROMPT_SHARE
    command: str = ""  # recorded in the build record

    def __post_init__(self) -> None:
        check_axes(self.axes)
        check_modes(self.mode, self.modes)

    @property
    def settings(self) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.top_p, self.no_repeat_ngram_size)

    def mode_of(self, axis: str) -> str:
        return self.modes.get(axis, self.mode)


def check_modes(default: str, modes: dict[str, str]) -> None:
    for axis, mode in {"(default)": default, **modes}.items():
        if mode not in MODES:
            raise PadlmError(f"unknown mode {mode!r} for axis {axis}; choose "
                             f"{' or '.join(MODES)}")
        if axis != "(default)" and axis not in AXES:
            raise PadlmError(f"--mode names unknown axis {axis!r}; axes: {', '.join(AXES)}")


def sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def record_path(out: Path) -> Path:
    return out.with_name(out.stem + ".build.json")


def row_seed(seed: int, prompt_id: str, side_id: str) -> int:
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{side_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sample_request(prompt: PoolPrompt, side_id: str, seed: int, temperature: float
                   ) -> SampleRequest:
    """Sample mode's request: the prompt as asked, the side's generation text as the
    instruction, the row's own seed."""
    return SampleRequest([{"role": "user", "content": prompt.prompt}], generation_text(side_id),
                         row_seed(seed, prompt.id, side_id), temperature)


def update_record(out: Path, key: str, value: dict) -> Path:
    """Set one entry of ``<out>.build.json`` (a label check, an engine comparison), keeping
    the rest; atomic, so an interrupted write leaves the old record."""
    path = record_path(out)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    write_json_atomic(path, data)
    return path


_SENTENCE_END = re.compile(r"[.!?)\]\"'](?=\s)|\n")
# The openings of a model declining: the sampler refused instead of taking the side.
_REFUSAL = re.compile(
    r"\b(?:I(?:'|’)?m|I am) (?:sorry|afraid|not able|unable)\b.{0,40}?\b(?:can(?:'|’)?t|cannot|"
    r"unable|not able|won(?:'|’)?t)\b"
    r"|\bI (?:can(?:'|’)?t|cannot|won(?:'|’)?t|will not) (?:assist|help|provide|comply|"
    r"fulfil|fulfill|do that|engage|support|create|write|generate)"
    r"|\bAs an AI\b", re.IGNORECASE | re.DOTALL)


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


def is_refusal(text: str) -> bool:
    """True when the response opens by declining ("I'm sorry, but I can't assist ...")."""
    return bool(_REFUSAL.search(text[:300]))


def generation_pool(pool_dir: Path, seed: int, hh_share: float, limit: int | None = None
                    ) -> list[PoolPrompt]:
    """Self-Instruct prompts and HH first turns, shuffled with the seed, interleaved so any
    prefix (``--limit``) has the requested share of each."""
    rng = random.Random(seed)
    instruct = self_instruct_prompts(pool_dir)
    hh = hh_first_turn_prompts(pool_dir)
    rng.shuffle(instruct)
    rng.shuffle(hh)
    pool, i, j = [], 0, 0
    while i < len(instruct) or j < len(hh):
        take_hh = j < len(hh) and (i >= len(instruct) or (j + 1) / (i + j + 1) <= hh_share)
        if take_hh:
            pool.append(hh[j])
            j += 1
        else:
            pool.append(instruct[i])
            i += 1
    return pool[:limit] if limit is not None else pool


@dataclass
class Pair:
    """Both sides of one (prompt, axis), cleaned, with why it is unusable (None: usable)."""

    prompt: PoolPrompt
    axis: Axis
    mode: str
    texts: tuple[str, str]
    tokens: int
    refused: tuple[bool, bool]
    reason: str | None
    sampled: bool = True  # False: skipped before sampling (its neutral answer was unusable)


class PairSampler:
    """Turns (prompt, axis) jobs into pairs in either mode, batching every request of a chunk
    together. Rewrite mode's neutral answers are greedy, made once per prompt and kept in
    ``neutrals`` (and in the sidecar, when one is given), then shared by every axis."""

    def __init__(self, sampler: Sampler, seed: int, settings: SamplingSettings,
                 temperature: float, neutral_log: Path | None = None) -> None:
        self.sampler, self.seed, self.settings = sampler, seed, settings
        self.temperature = temperature
        self.neutrals: dict[str, str] = {}
        self.neutral_log = None
        self.tokens = 0
        if neutral_log is not None:
            self.neutrals = {r["id"]: r["text"] for r in read_jsonl(neutral_log)}
            self.neutral_log = JsonlAppender(neutral_log)

    def _run(self, requests: Sequence[SampleRequest]) -> list[Sample]:
        samples = self.sampler.sample(requests, self.settings) if requests else []
        self.tokens += sum(s.tokens for s in samples)
        return samples

    def ensure_neutrals(self, prompts: Sequence[PoolPrompt]) -> None:
        missing = list({p.id: p for p in prompts if p.id not in self.neutrals}.values())
        samples = self._run([SampleRequest([{"role": "user", "content": p.prompt}],
                                           NEUTRAL_INSTRUCTION,
                                           row_seed(self.seed, p.id, "neutral"), 0.0)
                             for p in missing])
        for prompt, sample in zip(missing, samples, strict=True):
            text = clean_response(sample.text, sample.cut)
            self.neutrals[prompt.id] = text
            if self.neutral_log is not None:
                self.neutral_log.write({"id": prompt.id, "text": text,
                                        "sampler": self.sampler.name})

    def _request(self, prompt: PoolPrompt, side_id: str, mode: str) -> SampleRequest:
        if mode == "sample":
            return sample_request(prompt, side_id, self.seed, self.temperature)
        content = REWRITE_REQUEST.format(prompt=prompt.prompt, answer=self.neutrals[prompt.id],
                                         goal=generation_text(side_id))
        return SampleRequest([{"role": "user", "content": content}], REWRITE_INSTRUCTION,
                             row_seed(self.seed, prompt.id, side_id), self.temperature)

    def _unusable_neutral(self, prompt: PoolPrompt, mode: str) -> bool:
        text = self.neutrals.get(prompt.id, "") if mode == "rewrite" else None
        return text is not None and (is_refusal(text) or is_degenerate(text) is not None)

    def pairs(self, jobs: Sequence[tuple[PoolPrompt, Axis, str]]) -> list[Pair]:
        """One pair per ``(prompt, axis, mode)`` job, in order; a rewrite job whose neutral
        answer is a refusal or degenerate is dropped unsampled."""
        skip = [self._unusable_neutral(prompt, mode) for prompt, _, mode in jobs]
        requests = [self._request(prompt, side.id, mode)
                    for (prompt, axis, mode), skipped in zip(jobs, skip, strict=True)
                    if not skipped for side in (axis.a, axis.b)]
        samples = iter(self._run(requests))
        pairs = []
        for (prompt, axis, mode), skipped in zip(jobs, skip, strict=True):
            if skipped:
                pairs.append(Pair(prompt, axis, mode, ("", ""), 0, (False, False),
                                  NEUTRAL_DROP, sampled=False))
                continue
            a, b = next(samples), next(samples)
            texts = (clean_response(a.text, a.cut), clean_response(b.text, b.cut))
            refused = (is_refusal(texts[0]), is_refusal(texts[1]))
            reason = (is_degenerate(texts[0]) or is_degenerate(texts[1])
                      or ("identical" if texts[0] == texts[1] else None)
                      or ("refusal" if any(refused) else None))
            pairs.append(Pair(prompt, axis, mode, texts, a.tokens + b.tokens, refused, reason))
        return pairs

    def close(self) -> None:
        if self.neutral_log is not None:
            self.neutral_log.close()


def pair_rows(pair: Pair, sampler_name: str) -> list[PreferenceRow]:
    """The two mirrored rows of a usable pair."""
    rows = []
    for side, chosen, rejected in ((pair.axis.a, *pair.texts),
                                   (pair.axis.b, *reversed(pair.texts))):
        meta = {"key": [pair.prompt.id, side.id],
                "mirror": [pair.prompt.id, pair.axis.other(side.id).id],
                "axis": pair.axis.name, "mode": pair.mode, "sampler": sampler_name}
        if pair.axis.name in HELD_OUT_AXES:
            meta["held_out"] = True
        source = "contrastive" if pair.mode == "sample" else "rewrite"
        rows.append(PreferenceRow(prompt=pair.prompt.prompt, preference=side.text,
                                  chosen=chosen, rejected=rejected, dimension=side.id,
                                  source=f"{source}:{pair.prompt.source}", meta=meta))
    return rows


def done_keys(out: Path) -> set[tuple[str, str]]:
    """Keys already finished (written or dropped); the sidecar holds ``[prompt id, side]``
    lists (older builds) or ``{"key": [...], "dropped": reason}`` objects."""
    keys = set()
    for entry in read_jsonl(sidecar(out, ".done")):
        key = entry["key"] if isinstance(entry, dict) else entry
        keys.add((key[0], key[1]))
    return keys


def progress_summary(out: Path) -> dict:
    """What a build has finished so far, over all its runs (from the ``.done`` sidecar):
    pairs kept and dropped per axis side, and each side's refusal rate among its samples."""
    kept: Counter = Counter()
    dropped: Counter = Counter()
    sampled: Counter = Counter()
    refused: Counter = Counter()
    for entry in read_jsonl(sidecar(out, ".done")):
        if not isinstance(entry, dict) or entry["key"][1] not in SIDES:
            continue
        side, reason = entry["key"][1], entry.get("dropped")
        (dropped if reason else kept)[side] += 1
        if reason != NEUTRAL_DROP:
            sampled[side] += 1
            refused[side] += entry.get("refused", False)
    return {"kept": dict(sorted(kept.items())), "dropped": dict(sorted(dropped.items())),
            "refusal_rate": refusal_rates(sampled, refused)}


class _Writer:
    """Appends rows, then their keys to the ``.done`` sidecar (each line flushed and
    fsynced): a crash between the two at worst regenerates a chunk whose rows are then
    written twice, and duplicates are removed on load by key."""

    def __init__(self, out: Path) -> None:
        self.rows = JsonlAppender(out)
        self.done = JsonlAppender(sidecar(out, ".done"))

    def write(self, rows: Sequence[PreferenceRow], keys: Sequence[dict]) -> None:
        for row in rows:
            self.rows.write(row.to_dict())
        for key in keys:
            self.done.write(key)

    def close(self) -> None:
        self.rows.close()
        self.done.close()


class _Record:
    """``<out>.build.json``: every run's command, settings and running statistics, rewritten
    atomically after each chunk so an abrupt end leaves an honest record."""

    def __init__(self, config: BuildConfig, sampler: Sampler) -> None:
        self.path = record_path(config.out)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.run = {"command": config.command, "started": _now(), "sampler": sampler.name,
                    "engine": sampler.engine_name, "placement": sampler.placement,
                    "seed": config.seed,
                    "modes": {a: config.mode_of(a) for a in config.axes if a in AXES},
                    "max_new_tokens": config.max_new_tokens,
                    "temperature": config.temperature, "top_p": config.top_p,
                    "batch_size": config.batch_size}
        self.data.setdefault("runs", []).append(self.run)
        self.data["held_out_axes"] = list(HELD_OUT_AXES)

    def update(self, stats: dict) -> None:
        self.run.update(stats, updated=_now())
        write_json_atomic(self.path, self.data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def refusal_rates(sampled: Counter, refused: Counter) -> dict[str, float]:
    return {side: round(refused[side] / count, 3) for side, count in sorted(sampled.items())}


def _needing_neutrals(jobs: Sequence[tuple[PoolPrompt, Axis, str]], neutrals: dict[str, str],
                      count: int) -> list[PoolPrompt]:
    """The next ``count`` prompts of rewrite jobs that have no neutral answer yet."""
    found: dict[str, PoolPrompt] = {}
    for prompt, _, mode in jobs:
        if mode == "rewrite" and prompt.id not in neutrals:
            found.setdefault(prompt.id, prompt)
            if len(found) == count:
                break
    return list(found.values())


def build_dataset(sampler: Sampler, config: BuildConfig,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) a build; returns the statistics it also records."""
    began = time.perf_counter()
    keys = done_keys(config.out)
    writer = _Writer(config.out)
    record = _Record(config, sampler)
    pairs_from = PairSampler(sampler, config.seed, config.settings, config.temperature,
                             sidecar(config.out, ".neutral.jsonl"))
    counts: Counter = Counter()
    dropped: Counter = Counter()
    sampled: Counter = Counter()
    refused: Counter = Counter()

    def stats() -> dict:
        elapsed = time.perf_counter() - began
        return {"seconds": round(elapsed, 1), "rows_written": dict(counts),
                "pairs_dropped": dict(dropped), "generated_tokens": pairs_from.tokens,
                "tokens_per_second": round(pairs_from.tokens / max(elapsed, 1e-9), 1),
                "refusal_rate": refusal_rates(sampled, refused)}

    try:
        if HARMLESS in config.axes and ("hh-rlhf", HARMLESS) not in keys:
            rows = harmless_rows(config.pool_dir)
            random.Random(config.seed).shuffle(rows)
            rows = rows[:config.harmless_limit]
            for index, row in enumerate(rows):
                row.meta = {"key": [f"hh-rlhf:{index}", HARMLESS]}
            writer.write(rows, [{"key": ["hh-rlhf", HARMLESS]}])
            counts[HARMLESS] += len(rows)
        axes = [AXES[a] for a in config.axes if a in AXES]
        pool = generation_pool(config.pool_dir, config.seed, config.hh_prompt_share,
                               config.limit)
        jobs = [(prompt, axis, config.mode_of(axis.name)) for prompt in pool for axis in axes
                if (prompt.id, axis.a.id) not in keys]
        per_chunk = max(1, config.batch_size // 2)
        for start in range(0, len(jobs), per_chunk):
            chunk = jobs[start:start + per_chunk]
            if any(mode == "rewrite" and p.id not in pairs_from.neutrals
                   for p, _, mode in chunk):
                # a full batch of prompts ahead, so neutral answers decode in full batches too
                pairs_from.ensure_neutrals(_needing_neutrals(jobs[start:], pairs_from.neutrals,
                                                             config.batch_size))
            rows, done = [], []
            for pair in pairs_from.pairs(chunk):
                if pair.sampled:
                    for side, was_refused in zip((pair.axis.a, pair.axis.b), pair.refused,
                                                 strict=True):
                        sampled[side.id] += 1
                        refused[side.id] += was_refused
                drop = {"dropped": pair.reason} if pair.reason else {}
                done += [{"key": [pair.prompt.id, s.id], **drop,
                          **({"refused": True} if was_refused else {})}
                         for s, was_refused in zip((pair.axis.a, pair.axis.b), pair.refused,
                                                   strict=True)]
                if pair.reason:
                    dropped[f"{pair.axis.name}: {pair.reason}"] += 1
                    continue
                new_rows = pair_rows(pair, sampler.name)
                rows += new_rows
                counts.update(row.dimension for row in new_rows)
            writer.write(rows, done)
            record.update(stats())
            if progress is not None:
                progress(len(chunk), len(jobs))
        final = stats()
        record.update({**final, "finished": True})
        log.info("build finished: %s", final)
        return final
    finally:
        writer.close()
        pairs_from.close()
