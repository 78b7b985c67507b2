"""The library's front door: a base model, a PersRM, and every strategy over them.

>>> from padlm import Personalizer                                   # doctest: +SKIP
>>> engine = Personalizer("default")                                  # doctest: +SKIP
>>> engine.generate(["Why is the sky blue?"], preference="P1A", strategy="pad")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from padlm.decoding import (
    DecodeBatch,
    GenerationConfig,
    Request,
    Row,
    StepEvent,
    Strategy,
    echo_guard_refusal,
)
from padlm.errors import PadlmError
from padlm.models import DEFAULT_MODEL, LoadedModel, load_model
from padlm.persrm import PersonalizedRewardModel
from padlm.preferences import resolve_preference
from padlm.prompting import DEFAULT_PLACEMENT, PLACEMENTS, render
from padlm.strategies import (
    ArgsStrategy,
    ImplicitRewardScorer,
    LinearAlignmentStrategy,
    PadStrategy,
    PlainStrategy,
    SequenceScorer,
)

TOKEN_STRATEGIES = ("base", "prompt", "pad", "linear-alignment", "args")
STRATEGIES = (*TOKEN_STRATEGIES, "best-of-n")
BEST_OF_N_TEMPERATURE = 0.7  # best-of-n needs diverse samples; used when none is given


@dataclass
class Generation:
    """One finished response and what it cost."""

    text: str
    tokens: list[int]
    finish_reason: str
    seconds: float
    score: float | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)


def default_persrm_dir() -> Path | None:
    """The PersRM shipped inside the package for the default model, if this build has one."""
    path = Path(str(resources.files("padlm") / "assets" / "persrm-default"))
    return path if (path / "config.json").exists() else None


class Personalizer:
    """Holds the models; builds strategies lazily and caches them."""

    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_MODEL,
        persrm: str | PersonalizedRewardModel | None = "default",
        dtype: str = "float32",
        placement: str = DEFAULT_PLACEMENT,
        scorer: SequenceScorer | None = None,
    ) -> None:
        if placement not in PLACEMENTS:
            raise PadlmError(f"unknown placement {placement!r}; choose one of "
                             f"{', '.join(PLACEMENTS)}")
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, dtype)
        self.placement = placement
        self.persrm = self._load_persrm(persrm)
        self.scorer = scorer or ImplicitRewardScorer(self.lm, self.persrm)
        self.eos_ids = _eos_ids(self.lm)
        self._strategies: dict[str, object] = {}

    def _load_persrm(self, persrm) -> PersonalizedRewardModel:
        if isinstance(persrm, PersonalizedRewardModel):
            return persrm
        hidden = self.lm.model.config.hidden_size
        if persrm is None or persrm == "identity":
            return PersonalizedRewardModel.identity(self.lm.name, hidden)
        if persrm == "default":
            shipped = default_persrm_dir()
            if shipped is None or self.lm.name != _shipped_base(shipped):
                return PersonalizedRewardModel.identity(self.lm.name, hidden)
            persrm = str(shipped)
        if not Path(persrm).is_dir():
            raise PadlmError(f"PersRM directory {persrm} does not exist")
        # a LoRA PersRM wraps its own copy so the base model stays adapter-free
        loaded = PersonalizedRewardModel.load(persrm, base_model=None)
        if loaded.config.lora:
            loaded = PersonalizedRewardModel.load(persrm, copy.deepcopy(self.lm.model))
        if loaded.config.hidden_size != hidden:
            raise PadlmError(f"PersRM {persrm} was made for hidden size "
                             f"{loaded.config.hidden_size}, the model has {hidden}")
        return loaded

    @property
    def persrm_name(self) -> str:
        return self.persrm.path or "identity"

    def strategy(self, name: str):
        """The token-level strategy called ``name`` (built once, then reused)."""
        if name not in TOKEN_STRATEGIES:
            raise PadlmError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        if name not in self._strategies:
            self._strategies[name] = {
                "base": lambda: PlainStrategy(self.lm, False, self.placement),
                "prompt": lambda: PlainStrategy(self.lm, True, self.placement),
                "pad": lambda: PadStrategy(self.lm, self.persrm, self.placement),
                "linear-alignment": lambda: LinearAlignmentStrategy(self.lm, self.placement),
                "args": lambda: ArgsStrategy(self.lm, self.scorer, self.placement,
                                             self.persrm.config.recommended_weight),
            }[name]()
        return self._strategies[name]

    def batch(self, strategy: str | Strategy) -> DecodeBatch:
        """An empty decode batch that requests can join (the server's entry point).
        ``strategy`` is a name, or a strategy object built outside (e.g. PAD over another
        PersRM), so callers never assemble a batch from the engine's parts."""
        chosen = self.strategy(strategy) if isinstance(strategy, str) else strategy
        return DecodeBatch(chosen, self.lm.tokenizer, self.eos_ids)

    def request(self, prompt, preference: str | None = None,
                config: GenerationConfig | None = None) -> Request:
        return Request(prompt, resolve_preference(preference),
                       (config or GenerationConfig()).validate())

    def stream(self, prompt, preference: str | None = None, strategy: str = "pad",
               config: GenerationConfig | None = None) -> Iterator[StepEvent]:
        """Yield one event per generated token of a single prompt."""
        batch = self.batch(strategy)
        batch.join([self.request(prompt, preference, config)])
        while batch.rows:
            yield from batch.step()

    def generate(
        self, prompts: Sequence, preference: str | None = None, strategy: str = "pad",
        config: GenerationConfig | None = None, batch_size: int = 8, n: int = 4,
        on_batch=None,
    ) -> list[Generation]:
        """Decode every prompt (in batches) with one strategy; results in prompt order."""
        if strategy == "best-of-n":
            return [result for start in range(0, len(prompts), batch_size)
                    for result in self._best_of_n_many(prompts[start:start + batch_size],
                                                       preference, config, n)]
        requests = [self.request(p, preference, config) for p in prompts]
        results: list[Generation] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            began = time.perf_counter()
            rows = self._decode(strategy, chunk)
            seconds = (time.perf_counter() - began) / len(chunk)
            results.extend(_as_generation(row, seconds) for row in rows)
            if on_batch is not None:
                on_batch(len(chunk))
        return results

    def _decode(self, strategy: str, requests: Sequence[Request]) -> list[Row]:
        return self.batch(strategy).run(requests)

    def best_of_n(self, prompt, preference: str | None = None,
                  config: GenerationConfig | None = None, n: int = 4) -> Generation:
        """Sample ``n`` responses to the preference-prompted model; the scorer picks one."""
        return self._best_of_n_many([prompt], preference, config, n)[0]

    def _best_of_n_many(self, prompts: Sequence, preference: str | None,
                        config: GenerationConfig | None, n: int) -> list[Generation]:
        """Best-of-n for several prompts in ONE decode batch (``len(prompts) * n`` rows).

        Every row has its own seeded generator, so a prompt's samples are the same whatever
        else shares the batch: batching changes the speed, not the outputs."""
        if n < 1:
            raise PadlmError(f"n must be >= 1, got {n}")
        config = config or GenerationConfig()
        if config.echo_guard:  # its samples come from ``prompt``, which would name itself
            raise PadlmError(echo_guard_refusal("best-of-n"))
        if config.temperature == 0:
            config = replace(config, temperature=BEST_OF_N_TEMPERATURE)
        seed = config.seed if config.seed is not None else int(torch.seed() % 2**31)
        requests = [self.request(prompt, preference, replace(config, seed=seed + i))
                    for prompt in prompts for i in range(n)]
        began = time.perf_counter()
        rows = self._decode("prompt", requests)
        contexts = [render(self.lm.tokenizer, r.prompt, r.preference, self.placement)
                    for r in requests]
        extra = {}
        scorer = self.scorer
        if isinstance(scorer, ImplicitRewardScorer) and scorer.persrm.config.unconditioned:
            extra["neutral_contexts"] = [render(self.lm.tokenizer, r.prompt, "", self.placement)
                                         for r in requests]
        scores = scorer(contexts, [row.tokens for row in rows], **extra).view(
            len(prompts), n)
        seconds = (time.perf_counter() - began) / len(prompts)
        results = []
        for index, prompt_scores in enumerate(scores):
            best = int(prompt_scores.argmax())
            result = _as_generation(rows[index * n + best], seconds)
            result.score = float(prompt_scores[best])
            results.append(result)
        return results


def _as_generation(row: Row, seconds: float) -> Generation:
    return Generation(row.text, list(row.tokens), row.finish_reason or "length", seconds)


def _eos_ids(lm: LoadedModel) -> list[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def _shipped_base(directory: Path) -> str:
    import json

    return json.loads((directory / "config.json").read_text()).get("base_model", "")
