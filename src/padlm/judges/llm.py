"""Optional pairwise LLM judge over any OpenAI-compatible chat endpoint.

For one prompt and preference it shows two responses (a method's and another's, by default
``base``'s) and asks which one better follows the preference, with the P-Soups criteria
spelled out. The order is randomised per comparison (seeded by its content, so reruns ask the same
question) to cancel position bias on average, or, with :meth:`LLMJudge.compare_both_orders`,
each pair is asked in both orders (small judges are strongly position-biased, and the two
orders' disagreement measures by how much). TIE is offered unless ``ties=False``. Every
verdict is cached on disk keyed by the model and the exact conversation (so a changed judge
prompt asks afresh), and an interrupted run never pays twice.

Uses plain HTTP (``httpx``, a core dependency): ``POST {base_url}/chat/completions`` with a
bearer key read from an environment variable, i.e. what the official ``openai`` client sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from padlm.core.preferences import parse_preference
from padlm.errors import PadlmError
from padlm.records import JsonlAppender, read_jsonl

log = logging.getLogger(__name__)

CRITERIA = {
    "P1A": "Prefer the response an elementary school student could understand: simple words, "
           "short sentences, no jargon.",
    "P1B": "Prefer the response only a PhD student in the field could understand: technical "
           "vocabulary, depth, precision.",
    "P2A": "Prefer the concise response that gets to the point without padding.",
    "P2B": "Prefer the more informative response that gives the background and misses "
           "nothing important.",
    "P3A": "Prefer the friendly, witty, funny, humorous response, like a close friend.",
    "P3B": "Prefer the response written in an unfriendly manner.",
}

TOP_LOGPROBS = 20  # the most OpenAI's API returns

SYSTEM = ("You compare two AI responses to the same instruction for how well each follows a "
          "user's stated preference. Judge only the preference, not which answer you like. ")


def build_messages(prompt: str, preference: str, first: str, second: str,
                   ties: bool = True) -> list[dict]:
    """The judge's conversation: instruction, preference with criteria, responses A and B.
    ``ties=False`` leaves TIE out of the answers: small judges answer TIE to nearly every
    question they are offered it on, and a forced choice asked in both orders still scores
    a pair the judge cannot separate as a tie (it picks the same position twice)."""
    parsed = parse_preference(preference)
    criteria = " ".join(CRITERIA[i] for i in parsed.ids or () if i in CRITERIA)
    answers = "A, B or TIE" if ties else "A or B"
    user = (f"[Instruction]\n{prompt}\n\n[Preference]\n{parsed.text}\n"
            + (f"\n[Criteria]\n{criteria}\n" if criteria else "")
            + f"\n[Response A]\n{first}\n\n[Response B]\n{second}\n\n"
            f"Which response follows the preference better? Reply {answers}.")
    system = SYSTEM + (f"Answer with exactly one word: {answers}." if ties
                       else f"Answer with exactly one letter: {answers}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's reply, else None: its first word in any case, else
    the first standalone capital A/B/TIE (a lower-case article "a" later on is not a vote)."""
    words = re.findall(r"[A-Za-z]+", text)
    if words and words[0].upper() in {"A", "B", "TIE"}:
        return words[0].upper()
    match = re.search(r"\b(TIE|A|B)\b", text)
    return match.group(1) if match else None


@dataclass
class LLMJudge:
    base_url: str
    model: str
    api_key: str | None = None
    cache: Path | None = None
    timeout: float = 60.0
    seed: int = 0
    concurrency: int = 1  # questions in flight at once
    ties: bool = True  # offer TIE as an answer
    samples: int = 1  # > 1: that many votes at temperature 1 per question, a graded verdict
    logprobs: bool = False  # score by the probabilities of "A" and "B" (graded, one token)

    @classmethod
    def from_env(cls, base_url: str, model: str, key_env: str = "OPENAI_API_KEY",
                 cache: Path | None = None, concurrency: int = 1,
                 ties: bool = True, samples: int = 1, logprobs: bool = False) -> LLMJudge:
        if not base_url.startswith(("http://", "https://")):
            raise PadlmError(f"--judge-url must be an http(s) URL, got {base_url!r}")
        if concurrency < 1:
            raise PadlmError(f"--judge-concurrency must be at least 1, got {concurrency}")
        if samples < 1:
            raise PadlmError(f"--judge-samples must be at least 1, got {samples}")
        if logprobs and samples > 1:
            raise PadlmError("--judge-logprobs reads one greedy answer's probabilities; "
                             "drop --judge-samples")
        return cls(base_url.rstrip("/"), model, os.environ.get(key_env), cache,
                   concurrency=concurrency, ties=ties, samples=samples, logprobs=logprobs)

    def load_cache(self) -> dict[str, str]:
        """Every verdict cached so far, by question key (empty without a cache file)."""
        return {r["key"]: r["verdict"] for r in read_jsonl(self.cache)} if self.cache else {}

    def _ask(self, messages: list[dict], client: httpx.Client | None = None) -> list[dict]:
        """The judge's choices: one greedy (with its first token's top log-probabilities
        when ``logprobs``), or ``samples`` drawn at temperature 1."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 4}
        if self.samples > 1:
            body.update(temperature=1.0, n=self.samples, seed=self.seed)
        if self.logprobs:
            body.update(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        try:
            reply = (client or httpx).post(f"{self.base_url}/chat/completions", json=body,
                                           headers=headers, timeout=self.timeout)
            reply.raise_for_status()
            choices = reply.json()["choices"]
            if len(choices) != self.samples:
                raise ValueError(f"{len(choices)} choices for n={self.samples}")
            for choice in choices:
                choice["message"]["content"] = choice["message"]["content"] or ""
            return choices
        except httpx.HTTPStatusError as error:
            raise PadlmError(f"LLM judge at {self.base_url} answered "
                             f"{error.response.status_code}: {error.response.text[:200]}"
                             ) from None
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            raise PadlmError(f"LLM judge at {self.base_url} failed: {error}") from None

    def compare(self, prompt: str, preference: str, method: str, base: str,
                cache: dict[str, str] | None = None) -> float:
        """1 if the judge prefers ``method``, 0 if ``base``, 0.5 for TIE (or unparseable)."""
        results = self.compare_many([(prompt, preference, method, base)], cache)
        return results[0]

    def compare_many(self, items: list[tuple[str, str, str, str]],
                     cache: dict[str, str] | None = None) -> list[float]:
        """``compare`` for many ``(prompt, preference, method, base)``; ``cache`` (from
        ``load_cache``) lets several calls share one read of the cache file."""
        orders = [self._method_first(item) for item in items]
        questions = [(p, pref, m, b) if first else (p, pref, b, m)
                     for (p, pref, m, b), first in zip(items, orders, strict=True)]
        verdicts = self._verdicts(questions, cache)
        return [method_score(v, first) for v, first in zip(verdicts, orders, strict=True)]

    def compare_both_orders(self, items: list[tuple[str, str, str, str]],
                            cache: dict[str, str] | None = None
                            ) -> list[tuple[float, float]]:
        """Every ``(prompt, preference, method, other)`` asked twice, ``method`` shown first
        and then second: per item the method's score in each order. Averaging the two
        cancels position bias exactly; their disagreement measures it."""
        questions = [q for p, pref, m, o in items for q in ((p, pref, m, o), (p, pref, o, m))]
        verdicts = self._verdicts(questions, cache)
        return [(method_score(verdicts[2 * i], True), method_score(verdicts[2 * i + 1], False))
                for i in range(len(items))]

    def _method_first(self, item: tuple[str, str, str, str]) -> bool:
        """The shown order of one comparison, seeded by its content so reruns ask the same."""
        digest = hashlib.sha256(json.dumps(list(item)).encode()).digest()
        return random.Random(self.seed * 7919 + digest[0] * 256 + digest[1]).random() < 0.5

    def _key(self, question: tuple[str, str, str, str]) -> str:
        """The model and the exact conversation (a changed judge prompt is a new question),
        and the number of votes when they are sampled."""
        sampled = [{"samples": self.samples, "seed": self.seed}] if self.samples > 1 else []
        sampled += [{"logprobs": TOP_LOGPROBS}] if self.logprobs else []
        return hashlib.sha256(json.dumps([self.model, self._messages(question), *sampled])
                              .encode()).hexdigest()

    def _messages(self, question: tuple[str, str, str, str]) -> list[dict]:
        return build_messages(*question, ties=self.ties)

    def _verdicts(self, questions: list[tuple[str, str, str, str]],
                  cache: dict[str, str] | None) -> list[str]:
        """'A', 'B' or 'TIE' per ``(prompt, preference, first, second)`` as shown, each
        distinct question asked at most once, ``concurrency`` at a time (a batching server
        answers them in one batch). Every verdict is cached the moment it arrives, so a
        failed or interrupted run resumes with only the unanswered questions."""
        cache = self.load_cache() if cache is None else cache
        keys = [self._key(q) for q in questions]
        todo = {k: q for k, q in zip(keys, questions, strict=True) if k not in cache}
        if todo:
            with (self._appender() as appender, httpx.Client(timeout=self.timeout) as client,
                  ThreadPoolExecutor(self.concurrency) as pool,
                  tqdm(total=len(todo), desc="llm judge", unit="q") as bar):
                futures = {pool.submit(self._ask_verdict, client, q): k
                           for k, q in todo.items()}

                def keep(future: Future) -> None:
                    cache[futures[future]] = future.result()
                    if appender:
                        appender.write({"key": futures[future], "verdict": cache[futures[future]]})
                    bar.update()

                try:
                    for future in as_completed(futures):
                        keep(future)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    for future, key in futures.items():  # answers that arrived meanwhile
                        if (key not in cache and future.done() and not future.cancelled()
                                and future.exception() is None):
                            keep(future)
                    raise
        return [cache[k] for k in keys]

    def _ask_verdict(self, client: httpx.Client, question: tuple[str, str, str, str]) -> str:
        """'A', 'B' or 'TIE'; with samples, the votes joined by commas ('A,A,B,TIE'); with
        logprobs, the probability of 'A' among 'A' and 'B' ('p=0.62')."""
        choices = self._ask(self._messages(question), client)
        if self.logprobs:
            try:
                top = choices[0]["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError):
                raise PadlmError(f"the judge at {self.base_url} returned no logprobs; use an "
                                 "endpoint that does (vLLM's own server) or drop "
                                 "--judge-logprobs") from None
            share = first_letter_share(top)
            if share is None:
                log.warning("neither A nor B among the judge's top tokens: counted as TIE")
                return "TIE"
            return f"p={share:.6f}"
        votes = []
        for reply in (c["message"]["content"] for c in choices):
            vote = parse_verdict(reply)
            if vote is None:
                log.warning("unparseable judge reply %r counted as TIE", reply)
                vote = "TIE"
            votes.append(vote)
        return ",".join(votes)

    @contextmanager
    def _appender(self) -> Iterator[JsonlAppender | None]:
        appender = JsonlAppender(self.cache) if self.cache else None
        try:
            yield appender
        finally:
            if appender:
                appender.close()


def first_letter_share(top_logprobs: list[dict]) -> float | None:
    """P(A) / (P(A) + P(B)) from a first token's top log-probabilities (tokens compared
    without spaces or case), or None when neither letter is among them. Averaged over both
    orders it cancels a judge's constant lean to one position, which argmax answers cannot."""
    mass = {"A": 0.0, "B": 0.0}
    for entry in top_logprobs:
        letter = entry["token"].strip().upper()
        if letter in mass:
            mass[letter] += math.exp(entry["logprob"])
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


def method_score(verdict: str, method_first: bool) -> float:
    """The method's score from a verdict on the order shown: 1 won, 0 lost, 0.5 TIE; the
    mean of these over a sampled verdict's votes; the probability of the method's letter
    for a log-probability verdict."""
    if verdict.startswith("p="):
        first = float(verdict[2:])
        return first if method_first else 1.0 - first
    votes = verdict.split(",")
    return sum(0.5 if v == "TIE" else float((v == "A") == method_first) for v in votes
               ) / len(votes)
