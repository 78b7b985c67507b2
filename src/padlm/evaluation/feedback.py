"""``padlm eval feedback``: does a profile learned from choices decode what the user wanted?

Simulated users each hold a hidden target (one side of each P-Soups axis: the eight
combinations) and choose between two answers by the rule judges as their taste: for each
axis, the answer the axis's judge (readability grade for P1, word count for P2, VADER for
P3) says is further to the target's side gets that axis's vote; the majority wins. The
learner never sees the judges: it learns from padlm's own per-dimension reward models
(:mod:`padlm.profiles.features`). A second user per target chooses at random (the control
that must stay at ``base``).

Each round, every user is shown the two answers the profile's explore mode decodes (they
differ on the axes the profile is least sure of) to a prompt of the training pool
(self-instruct, never ``koala_eval_50``), and chooses. After ``n`` choices the profile's
preference decodes the 50 ``koala_eval_50`` prompts, scored by directional win against
``base`` for the hidden target (mean over its three sides), beside the oracle: the same
strategy given the target as a stated preference.

Resumable: profiles and their choices live in ``out/profiles.db`` (a choice and its event in
one transaction), each round's answers in ``out/rounds.jsonl``; the learned preference at
``n`` choices is replayed from the stored choices. The koala generations go through the
evaluation harness's keyed cache (``out/generations.jsonl``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
from tqdm import tqdm

from padlm.atomic import write_json_atomic
from padlm.core.config import GenerationConfig
from padlm.core.decoding import Request
from padlm.core.planning import plan
from padlm.core.preferences import PSOUPS, parse_preference
from padlm.data.axes import AXES as DATA_AXES
from padlm.data.axes import Axis
from padlm.errors import PadlmError
from padlm.evaluation import harness
from padlm.evaluation.stats import outcomes, standard_error
from padlm.judges import JUDGES, PRIMARY, primary_direction
from padlm.profiles.features import AXES, FREE_TEXT_AXES, PSOUPS_AXES
from padlm.profiles.learning import Posterior, update
from padlm.profiles.profile import compose, learned_sides
from padlm.profiles.service import ProfileService
from padlm.profiles.store import open_store
from padlm.records import JsonlAppender

log = logging.getLogger(__name__)

TENANT = "simulation"
CHOOSERS = ("taste", "random")
DEFAULT_CHECKPOINTS = (0, 2, 4, 8, 16, 32)
MAX_TRAINING_PROMPT_CHARS = 400  # the pool's long inputs (whole articles) would dominate time
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "feedback-summary.json"


@dataclass(frozen=True)
class SimulatedUser:
    target: tuple[str, ...]  # one side per axis, e.g. ("P1A", "P2B", "P3A")
    chooser: str  # "taste" (the judges) or "random"

    @property
    def group(self) -> str:
        """Which kind of taste: the P-Soups axes, or free-text ones."""
        return "P-Soups" if self.target[0] in PSOUPS else "free-text"

    @property
    def name(self) -> str:
        return f"{'+'.join(self.target)}/{self.chooser}"


def simulated_users(axes: Sequence[Axis] = AXES) -> list[SimulatedUser]:
    """Every P-Soups combination, and every combination of the first two free-text axes of
    the profile that the judges can read (``format``, ``energy``), once per chooser."""
    names = [axis.name for axis in axes]
    targets = []
    if all(name in names for name in PSOUPS_AXES):
        targets += list(product(*[_sides(DATA_AXES[name]) for name in PSOUPS_AXES]))
    judged = [axis for axis in axes if axis.name in judged_axes()]
    if len(judged) >= 2:
        targets += list(product(*[_sides(axis) for axis in judged[:2]]))
    return [SimulatedUser(t, c) for c in CHOOSERS for t in targets]


def _sides(axis: Axis) -> tuple[str, str]:
    return axis.a.id, axis.b.id


def judged_axes() -> list[str]:
    """The free-text axes a simulated user can hold a taste on (a rule judge reads both
    sides)."""
    return [name for name in FREE_TEXT_AXES if all(side in PRIMARY
                                                    for side in _sides(DATA_AXES[name]))]


def judge_scores(prompts: Sequence[str], texts: Sequence[str],
                 axes: Sequence[Axis] = AXES) -> list[dict[str, float]]:
    """The rule judges a simulated user's taste can read on ``axes``, per answer."""
    names = sorted({primary_direction(side)[0] for axis in axes for side in _sides(axis)
                    if side in PRIMARY})
    columns = {name: JUDGES[name].score(prompts, texts) for name in names}
    return [{name: columns[name][i] for name in names} for i in range(len(texts))]


def taste_choice(target: Sequence[str], first: dict[str, float], second: dict[str, float],
                 tie_break: random.Random) -> int:
    """0 when the first answer wins the target's majority vote, 1 when the second does
    (an axis whose judge scores both alike abstains; a tied vote is a coin flip)."""
    votes = 0
    for side in target:
        judge, sign = primary_direction(side)
        votes += int(np.sign(sign * (first[judge] - second[judge])))
    if votes == 0:
        return tie_break.randrange(2)
    return 0 if votes > 0 else 1


def training_prompts(pool_dir: Path, rounds: int, seed: int) -> list[dict]:
    """The rounds' prompts: short self-instruct tasks in a seeded order, the same for every
    user (so users differ by taste alone)."""
    from padlm.data.pools import self_instruct_prompts

    pool = [p for p in self_instruct_prompts(pool_dir)
            if len(p.prompt) <= MAX_TRAINING_PROMPT_CHARS]
    random.Random(seed).shuffle(pool)
    if len(pool) < rounds:
        raise PadlmError(f"the training pool has {len(pool)} short prompts, fewer than "
                         f"--rounds {rounds}")
    return [{"id": p.id, "prompt": p.prompt} for p in pool[:rounds]]


def decode(engine, strategy: str, items: Sequence[tuple[str, object]],
           config: GenerationConfig, batch_size: int) -> list[str]:
    """Each (prompt, preference) with ``strategy``, users' rows sharing batches; texts in
    order. A (prompt, preference) several users were shown is decoded once (users of alike
    profiles are often shown the same pair; one input decodes to one text at one config)."""
    keys = [(prompt, parse_preference(preference)) for prompt, preference in items]
    distinct = list(dict.fromkeys(keys))
    requests = [plan(engine, strategy, Request(prompt, preference, config))
                for prompt, preference in distinct]
    texts = []
    for start in range(0, len(requests), batch_size):
        rows = engine.batch(strategy).run(requests[start:start + batch_size])
        texts.extend(row.text for row in rows)
    decoded = dict(zip(distinct, texts, strict=True))
    return [decoded[key] for key in keys]


def replayed_sides(events: Sequence[dict], checkpoints: Sequence[int],
                   axes: Sequence[Axis] = AXES) -> dict[int, list[str]]:
    """The profile's sides after ``n`` choices, for each checkpoint it has reached, from the
    stored choices (the learner is deterministic, so replaying them is exact)."""
    posterior, out = Posterior.prior(len(axes)), {}
    choices = [e["z"] for e in events if e.get("kind") == "choice"]
    for n in range(len(choices) + 1):
        if n in checkpoints:
            out[n] = learned_sides(posterior, axes)
        if n < len(choices):
            posterior = update(posterior, choices[n])
    return out


def composition(sides: Sequence[str]) -> str:
    """The preference a composition of sides is decoded with, as the harness takes it:
    preset ids (``P1A+P2B``), or the sides' texts when one is a free-text side."""
    preference = compose(list(sides), None)
    return "+".join(preference.ids) if preference.ids else preference.text


def learn(engine, service: ProfileService, users: Sequence[SimulatedUser],
          prompts: Sequence[dict], strategy: str, config: GenerationConfig, out: Path,
          batch_size: int, seed: int, progress: bool = True) -> None:
    """Play every round not yet played; a round's choices are stored before the next."""
    appender = JsonlAppender(out / ROUNDS_FILE)
    try:
        bar = tqdm(total=len(prompts), desc="rounds", unit="round", disable=not progress)
        for number, item in enumerate(prompts):
            playing = [u for u in users
                       if _choices(service, u) == number]
            bar.update(1)
            if not playing:
                continue
            pairs = [service.exploring(TENANT, u.name)[0] for u in playing]
            texts = decode(engine, strategy, [(item["prompt"], p) for pair in pairs
                                              for p in pair], config, batch_size)
            scores = judge_scores([item["prompt"]] * len(texts), texts, service.axes)
            for i, user in enumerate(playing):
                first, second = texts[2 * i], texts[2 * i + 1]
                coin = random.Random(f"{seed}/{user.name}/{number}")
                picked = (taste_choice(user.target, scores[2 * i], scores[2 * i + 1], coin)
                          if user.chooser == "taste" else coin.randrange(2))
                chosen, rejected = (first, second) if picked == 0 else (second, first)
                service.choose_texts(TENANT, user.name, item["prompt"], chosen, rejected)
                appender.write({"user": user.name, "round": number, "prompt": item["id"],
                                "preferences": [p.text for p in pairs[i]],
                                "texts": [first, second], "picked": picked})
        bar.close()
    finally:
        appender.close()


def _choices(service: ProfileService, user: SimulatedUser) -> int:
    record = service.store.get(TENANT, user.name)
    return record.choices if record else 0


def user_score(target: Sequence[str], texts: dict[str, str], base: dict[str, str],
               ids: Sequence[str]) -> np.ndarray:
    """Per-prompt directional outcome (win 1, tie 1/2, loss 0) against ``base``, averaged
    over the target's sides."""
    prompts = list(ids)
    per_side = []
    for side in target:
        judge, sign = primary_direction(side)
        method = JUDGES[judge].score(prompts, [texts[i] for i in ids])
        reference = JUDGES[judge].score(prompts, [base[i] for i in ids])
        per_side.append(outcomes(method, reference, sign))
    return np.mean(per_side, axis=0)


def summarize(users: Sequence[SimulatedUser], sides: dict[str, dict[int, list[str]]],
              cells: dict[str, dict[str, str]], ids: Sequence[str],
              checkpoints: Sequence[int]) -> dict:
    """Learning curves: each chooser's mean directional win over its users after ``n``
    choices, with its SE over users, the oracle's, and the fraction of the oracle's gain
    over ``base`` (a win rate of 1/2) the learned profile reaches."""
    base = cells[""]
    scored: dict[tuple, float] = {}

    def win(target: tuple[str, ...], sides_: Sequence[str]) -> float:
        """A target's mean outcome for a composition's cell, judged once per pair."""
        key = (target, composition(sides_))
        if key not in scored:
            scored[key] = float(user_score(target, cells[key[1]], base, ids).mean())
        return scored[key]

    oracle = {u.target: win(u.target, u.target) for u in users}
    oracle_values = list(oracle.values())
    rows = []
    for n in checkpoints:
        row = {"choices": n}
        reached = [u for u in users if n in sides[u.name]]
        learned = {u.name: win(u.target, sides[u.name][n]) for u in reached}
        for chooser in CHOOSERS:
            scores = [learned[u.name] for u in reached if u.chooser == chooser]
            if scores:
                row[chooser] = {"win": round(float(np.mean(scores)), 4),
                                "se": round(standard_error(scores), 4), "users": len(scores)}
        taste_users = [u for u in reached if u.chooser == "taste"]
        if taste_users:
            gaps = [learned[u.name] - oracle[u.target] for u in taste_users]
            oracle_gain = np.mean([oracle[u.target] - 0.5 for u in taste_users])
            # undefined (None) when the oracle itself does not move off base
            row["fraction_of_oracle_gain"] = round(float(
                (np.mean([learned[u.name] for u in taste_users]) - 0.5) / oracle_gain), 4) \
                if oracle_gain else None
            # paired by user: what the target's own difficulty adds to both cancels
            row["minus_oracle"] = {"mean": round(float(np.mean(gaps)), 4),
                                   "se": round(standard_error(gaps), 4)}
            row["sides_right"] = round(float(np.mean(
                [sum(side in u.target for side in sides[u.name][n]) / len(u.target)
                 for u in taste_users])), 4)
        rows.append(row)
    return {"oracle": {"win": round(float(np.mean(oracle_values)), 4),
                       "se": round(standard_error(oracle_values), 4),
                       "per_target": {"+".join(t): round(v, 4) for t, v in oracle.items()}},
            "curve": rows,
            "learned_sides": {name: {str(n): "+".join(s) for n, s in by_n.items()}
                              for name, by_n in sides.items()}}


def check_checkpoints(checkpoints: Sequence[int], rounds: int) -> None:
    if not checkpoints or min(checkpoints) < 0 or max(checkpoints) > rounds:
        raise PadlmError(f"--checkpoints must lie in 0..--rounds ({rounds})",
                         param="checkpoints")


def run(engine, out: Path, strategy: str = "pad", rounds: int = 32,
        checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS, config: GenerationConfig | None = None,
        batch_size: int = 16, seed: int = 0, limit: int | None = None,
        pool_dir: Path | None = None, progress: bool = True, command: str | None = None,
        axes: Sequence[Axis] = AXES) -> dict:
    """Play the rounds, decode the benchmark for every learned preference and the oracles,
    and write the curve (``feedback-summary.json``, ``feedback.md``, ``feedback.png``);
    with free-text ``axes`` the curve of each group of targets too."""
    from padlm.data.pools import default_pool_dir

    check_checkpoints(checkpoints, rounds)
    config = config or GenerationConfig()
    out.mkdir(parents=True, exist_ok=True)
    prompts = training_prompts(pool_dir or default_pool_dir(), rounds, seed)
    users = simulated_users(axes)
    service = ProfileService(open_store(f"sqlite:///{out / 'profiles.db'}"), axes=axes)
    try:
        learn(engine, service, users, prompts, strategy, replace(config, seed=seed), out,
              batch_size, seed, progress)
        sides = {u.name: replayed_sides(service.store.events(TENANT, u.name), checkpoints,
                                         axes)
                 for u in users}
    finally:
        service.store.close()
    every = [s for by_n in sides.values() for s in by_n.values() if s] + \
        [u.target for u in users]
    compositions = sorted({composition(s) for s in every})
    # the harness asks a free-text preference which way its judges should move; this run
    # scores every target itself (user_score), so it names the sides' judges
    directions = sorted({primary_direction(side) for s in every for side in s
                         if side in PRIMARY})
    plan_ = harness.EvalPlan("psoups", compositions, [strategy], limit=limit, config=config,
                             batch_size=batch_size, directions=directions)
    records = harness.generate(engine, plan_, out, progress)
    keys = harness.CellKeys.of(engine, plan_)
    items = harness.load_benchmark("psoups", limit)
    ids = [i["id"] for i in items]
    by_key = {r["key"]: r["text"] for r in records}
    weight = harness.recommended_weight(engine, plan_)
    cells: dict[str, dict[str, str]] = {}
    for job in harness.jobs(plan_, weight):
        cells[job.preference] = {i: by_key[keys.key(i, job)] for i in ids}
    summary = summarize(users, sides, cells, ids, checkpoints)
    groups = sorted({u.group for u in users})
    if len(groups) > 1:
        summary["groups"] = {group: summarize([u for u in users if u.group == group], sides,
                                              cells, ids, checkpoints) for group in groups}
    summary["axes"] = [axis.name for axis in axes]
    summary.update(strategy=strategy, rounds=rounds, seed=seed, prompts=len(ids),
                   model=engine.lm.name, command=command,
                   config=harness.config_key(config, engine))
    write_json_atomic(out / SUMMARY_FILE, summary)
    write_curve(summary, out)
    return summary


def _table(summary: dict) -> list[str]:
    """The curve as a markdown table."""
    oracle = summary["oracle"]
    lines = ["| choices | learned (taste) | random chooser | oracle | fraction of oracle gain "
             "| learned - oracle, paired by user | target sides learned |",
             "|---|---|---|---|---|---|---|"]
    for row in summary["curve"]:
        cell = {c: f"{row[c]['win']:.3f} ({row[c]['se']:.3f})" if c in row else "-"
                for c in CHOOSERS}
        fraction = row.get("fraction_of_oracle_gain")
        gap = row.get("minus_oracle")
        paired = "-" if gap is None else f"{gap['mean']:+.3f} ({gap['se']:.3f})"
        lines.append(f"| {row['choices']} | {cell['taste']} | {cell['random']} | "
                     f"{oracle['win']:.3f} ({oracle['se']:.3f}) | "
                     f"{'-' if fraction is None else f'{fraction:.2f}'} | "
                     f"{paired} | "
                     f"{row.get('sides_right', 0):.2f} |")
    return lines


def write_curve(summary: dict, out: Path) -> None:
    """``feedback.md`` (the table) and ``feedback.png`` (the curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle = summary["oracle"]
    lines = [f"Directional win against base on koala_eval_50 ({summary['prompts']} prompts), "
             f"mean over simulated users (SE over users); strategy {summary['strategy']}, "
             f"model {summary['model']}, profile axes {', '.join(summary['axes'])}.", "",
             *_table(summary)]
    for group, part in summary.get("groups", {}).items():
        lines += ["", f"Users with {group} targets:", "", *_table(part)]
    (out / "feedback.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    figure, axes = plt.subplots(figsize=(6, 4))
    for chooser, style in zip(CHOOSERS, ("o-", "s--"), strict=True):
        points = [(r["choices"], r[chooser]["win"], r[chooser]["se"])
                  for r in summary["curve"] if chooser in r]
        if points:
            x, y, e = zip(*points, strict=True)
            axes.errorbar(x, y, yerr=e, fmt=style, capsize=3,
                          label="learned profile" if chooser == "taste" else "random chooser")
    axes.axhline(oracle["win"], color="green", linestyle=":", label="oracle (stated target)")
    axes.axhline(0.5, color="grey", linewidth=0.8, label="base")
    marks = [row["choices"] for row in summary["curve"]]
    axes.set_xscale("symlog", linthresh=1, base=2)
    axes.set_xticks(marks, [str(m) for m in marks])
    axes.set_xlim(-0.3, max(marks) * 1.3)
    axes.set_xlabel("choices seen")
    axes.set_ylabel("directional win vs base (target sides)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "feedback.png", dpi=120)
    plt.close(figure)
