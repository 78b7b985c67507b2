"""``padlm train pcm``: the Preference Control Model trained online with REBEL.

Each step takes training prompts from the Self-Instruct and HH-RLHF pools (never
``koala_eval_50``, never a validation-split prompt) paired with the 8 combinations
``(P1A|P1B) x (P2A|P2B) x (P3A|P3B)`` in turn, samples TWO responses per pair from the
mixture itself (the current PCM, temperature 1), scores them with the per-dimension reward
models against the base model's greedy response, and regresses their log-ratio gap onto the
reward gap (:func:`padlm.core.guidance.rebel_loss`). The experts are frozen and only ``alpha``
depends on the PCM, so the experts' log-probs of the sampled tokens are computed once per
step and every update reuses them.

A checkpoint (written atomically every ``checkpoint_every`` steps) lets an interrupted run
resume where it stopped; with the same settings the resumed run ends exactly where an
uninterrupted one does (each step's prompts and sampling seeds are functions of the step).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from pathlib import Path

import torch

from padlm.atomic import atomic_directory
from padlm.core import guidance
from padlm.core.config import GenerationConfig
from padlm.core.decoding import DecodeBatch, Request, Row
from padlm.core.preferences import PSOUPS_COMBINATIONS, parse_preference
from padlm.core.strategies import NEUTRAL, BaseStrategy
from padlm.data.pools import (
    PoolPrompt,
    default_pool_dir,
    hh_first_turn_prompts,
    self_instruct_prompts,
)
from padlm.data.schema import load_rows
from padlm.data.splits import is_validation
from padlm.orchestration.configs import PCMTrainConfig
from padlm.orchestration.experts import PCM_DIR, Experts
from padlm.orchestration.pcm import PCMConfig, PreferenceControlModel
from padlm.orchestration.rewards import DimensionRewards, train_rewards
from padlm.orchestration.strategies import MixStrategy, pcm_weights
from padlm.training.pipeline import file_sha256

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """One step's sampled responses and everything the REBEL updates need from them."""

    rows: list[Row]
    lanes: list[tuple[str, ...]]
    counts: list[int]
    hidden: torch.Tensor  # [tokens, lanes, d] all responses' states, concatenated
    expert_log_probs: torch.Tensor  # [tokens, lanes, 1] each lane's log p(y_t)
    segment: torch.Tensor  # [tokens] which response each token belongs to
    rewards: torch.Tensor  # [responses]
    extra: dict = field(default_factory=dict)


def prompt_pools(pool_dir: Path) -> tuple[list[PoolPrompt], list[PoolPrompt]]:
    """(training, held-out) prompts: Self-Instruct and HH-RLHF first turns, split by prompt
    with the repository's validation split, so held-out prompts never reach RL."""
    pool = self_instruct_prompts(pool_dir) + hh_first_turn_prompts(pool_dir)
    train = [p for p in pool if not is_validation(p.prompt)]
    held_out = [p for p in pool if is_validation(p.prompt)]
    return train, held_out


def sequence_log_probs(pcm, rollouts: Rollouts) -> torch.Tensor:
    """``log pi(y) = sum_t log sum_i alpha_i(s_t) p_i(y_t | s_t)`` per response, with the
    weights of ``pcm`` (differentiable through it)."""
    index = rollouts.segment.tolist()
    alpha = pcm_weights(pcm, rollouts.hidden,
                        [rollouts.rows[i].request.preference.text for i in index],
                        [rollouts.lanes[i] for i in index], [rollouts.counts[i] for i in index])
    token = guidance.mixture_log_probs(rollouts.expert_log_probs, alpha)[:, 0]
    return token.new_zeros(len(rollouts.rows)).index_add(0, rollouts.segment, token)


class PCMTrainer:
    """Holds the experts, reward models, reference responses and the PCM being trained."""

    def __init__(self, experts: Experts, config: PCMTrainConfig,
                 rewards: DimensionRewards | None = None) -> None:
        self.experts = experts
        self.config = config.validate()
        self.lm = experts.lm
        self.eos = self.lm.tokenizer.eos_token_id
        self.train_prompts, held_out = prompt_pools(config.pool_dir or default_pool_dir())
        order = random.Random(config.seed).sample(held_out, len(held_out))
        self.eval_set = [(order[i].prompt, combo) for i, (combo, _) in enumerate(
            product(PSOUPS_COMBINATIONS, range(config.eval_per_combination)))]
        self.rewards = rewards or train_rewards(
            [row for path in config.data for row in load_rows(path)[0]], experts.dimensions)
        self.references: dict[str, str] = {}
        torch.manual_seed(config.seed)
        pcm = PreferenceControlModel(PCMConfig(self.lm.model.config.hidden_size, config.width))
        self.pcm = pcm.to(self.lm.device)
        experts.pcm = self.pcm  # the mixture samples with the PCM being trained
        self.optimizer = torch.optim.Adam(self.pcm.parameters(), lr=config.lr)
        self.strategy = MixStrategy(experts)

    # --- rollouts ---

    def decode(self, pairs: Sequence[tuple[str, str]], temperature: float, seeds: Sequence[int]
               ) -> list[Row]:
        config = GenerationConfig(max_new_tokens=self.config.max_new_tokens,
                                  temperature=temperature)
        requests = [Request(prompt, parse_preference(combo), replace(config, seed=seed))
                    for (prompt, combo), seed in zip(pairs, seeds, strict=True)]
        return DecodeBatch(self.strategy, self.lm.tokenizer, [self.eos]).run(requests)

    def reference_texts(self, prompts: Sequence[str]) -> list[str]:
        """``y_ref``: the base model's greedy response (no preference), once per prompt."""
        missing = sorted({p for p in prompts if p not in self.references})
        if missing:
            base = BaseStrategy(self.lm, (NEUTRAL,), self.experts.config.placement)
            config = GenerationConfig(max_new_tokens=self.config.max_new_tokens)
            rows = DecodeBatch(base, self.lm.tokenizer, [self.eos]).run(
                [Request(p, config=config) for p in missing])
            self.references.update({p: row.text for p, row in zip(missing, rows, strict=True)})
        return [self.references[p] for p in prompts]

    def score(self, rows: Sequence[Row], pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        prompts = [prompt for prompt, _ in pairs]
        return self.rewards.reward(prompts, [row.text for row in rows],
                                   self.reference_texts(prompts),
                                   [self.experts.select(parse_preference(combo))
                                    for _, combo in pairs])

    def rollouts(self, step: int) -> Rollouts:
        """Two samples of the mixture for each of this step's (prompt, combination) pairs."""
        rng = random.Random(f"{self.config.seed}:{step}")
        count = self.config.prompts_per_step
        combinations = PSOUPS_COMBINATIONS
        pairs = [(rng.choice(self.train_prompts).prompt,
                  combinations[(step * count + i) % len(combinations)]) for i in range(count)]
        doubled = [pair for pair in pairs for _ in range(2)]
        seeds = [rng.randrange(2**31) for _ in doubled]
        rows = self.decode(doubled, 1.0, seeds)
        chosen = [self.experts.select(parse_preference(combo)) for _, combo in doubled]
        lanes = [self.experts.lane_experts(ids) for ids in chosen]
        # the response as sampled, ending in EOS when it stopped there
        responses = [row.tokens + ([self.eos] if row.finish_reason == "stop" else [])
                     for row in rows]
        states = self.experts.response_states([p for p, _ in doubled], lanes, responses)
        hidden = torch.cat([h for h, _ in states])
        # everything the REBEL update combines lives where the PCM and the states live
        return Rollouts(
            rows, lanes, [len(ids) for ids in chosen], hidden=hidden,
            expert_log_probs=torch.cat([lp for _, lp in states])[..., None],
            segment=torch.cat([torch.full((len(r),), i, device=hidden.device)
                               for i, r in enumerate(responses)]),
            rewards=self.score(rows, doubled).to(hidden.device),
            extra={"entropy": float(torch.cat([
                guidance.weight_entropy(torch.tensor([list(t.values()) for t in row.trace]))
                for row in rows]).mean())})

    # --- REBEL ---

    def update(self, rollouts: Rollouts) -> float:
        """``updates_per_step`` gradient steps of the REBEL regression on one step's pairs."""
        with torch.no_grad():
            old = sequence_log_probs(self.pcm, rollouts)
        reward = rollouts.rewards
        losses = []
        for _ in range(self.config.updates_per_step):
            new = sequence_log_probs(self.pcm, rollouts)
            loss = guidance.rebel_loss(new[0::2], old[0::2], new[1::2], old[1::2],
                                       reward[0::2], reward[1::2], self.config.eta)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def evaluate(self) -> dict:
        """Mean reward of greedy mixture responses on the held-out (prompt, combination)
        pairs, overall and per combination."""
        if not self.eval_set:
            return {}
        rows = self.decode(self.eval_set, 0.0, [0] * len(self.eval_set))
        rewards = self.score(rows, self.eval_set).tolist()
        per: dict[str, list[float]] = {}
        for (_, combo), reward in zip(self.eval_set, rewards, strict=True):
            per.setdefault(combo, []).append(reward)
        return {"reward": round(sum(rewards) / len(rewards), 4),
                "per_combination": {c: round(sum(v) / len(v), 4) for c, v in per.items()}}

    # --- the loop, checkpoints and outputs ---

    def checkpoint_path(self) -> Path:
        return self.config.out.with_name(self.config.out.name + ".checkpoint.pt")

    def signature(self) -> dict:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.experts.tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return {"config": self.config.signature(), "experts": asdict(self.experts.config),
                "experts_sha256": digest.hexdigest()}

    def save_checkpoint(self, state: dict) -> None:
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        torch.save({**state, "signature": self.signature(), "pcm": self.pcm.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "references": self.references},
                   staging)
        os.replace(staging, path)

    def resume(self) -> dict | None:
        path = self.checkpoint_path()
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=False)
        if saved.get("signature") != self.signature():
            log.warning("ignoring %s: it was made with other settings or experts", path)
            return None
        self.pcm.load_state_dict(saved["pcm"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.references = dict(saved["references"])
        log.info("resuming from %s after step %d", path, len(saved["history"]))
        return saved

    def train(self, on_step: Callable[[dict], None] | None = None) -> Experts:
        """Run (or resume) training, save experts + PCM to ``out``; returns the experts."""
        from tqdm import tqdm

        began = time.perf_counter()
        saved = self.resume()
        history = list(saved["history"]) if saved else []
        resumed_seconds = sum(r["seconds"] for r in history)  # steps run before a resume
        before = saved["before"] if saved else self.evaluate()
        with tqdm(total=self.config.steps, initial=len(history), desc="PCM (REBEL)",
                  unit="step") as bar:
            for step in range(len(history), self.config.steps):
                tick = time.perf_counter()
                rollouts = self.rollouts(step)
                loss = self.update(rollouts)
                record = {"step": step + 1, "loss": round(loss, 5),
                          "reward": round(float(rollouts.rewards.mean()), 4),
                          "entropy": round(rollouts.extra["entropy"], 4),
                          "seconds": round(time.perf_counter() - tick, 2)}
                history.append(record)
                bar.update()
                bar.set_postfix(reward=record["reward"], entropy=record["entropy"])
                if (step + 1) % self.config.checkpoint_every == 0:
                    self.save_checkpoint({"history": history, "before": before})
                if on_step is not None:
                    on_step(record)
        after = self.evaluate()
        self.pcm.config.training = {
            "method": "REBEL", "parameters": self.pcm.parameter_count(),
            "config": self.config.signature(), "steps": self.config.steps,
            "history": history, "before": before, "after": after,
            "reward_models": self.rewards.metrics,
            "data_sha256": {str(path): file_sha256(path) for path in self.config.data},
            "seconds": round(time.perf_counter() - began + resumed_seconds, 1),
            "command": self.config.command}
        self.pcm.eval()
        self.save(history)
        self.checkpoint_path().unlink(missing_ok=True)
        return self.experts

    def save(self, history: Sequence[dict]) -> None:
        """Experts + ``pcm/`` (weights, config, reward models, curves) in one directory."""
        with atomic_directory(self.config.out) as staging:
            self.experts.write(staging)
            self.rewards.write(staging / PCM_DIR)
            plot_curves(history, staging / PCM_DIR)
        self.experts.path = str(self.config.out)


def plot_curves(history: Sequence[dict], directory: Path) -> None:
    """``reward.png`` and ``entropy.png``: the rollouts' mean reward and mean per-token
    weight entropy at each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    for key, label in (("reward", "mean reward of the rollouts"),
                       ("entropy", "mean entropy of the mixing weights (nats)")):
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.plot(steps, [r[key] for r in history], marker=".")
        axes.set_xlabel("REBEL step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(directory / f"{key}.png", dpi=100)
        plt.close(figure)
