"""``padlm eval feedback``'s simulation: the simulated user's choice rule by hand, who the
users are, the replay of a profile's sides, decoding each distinct input once, and a whole
resumable run on a tiny model with the real reward-model features."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import TextFeatures

from padlm.core.config import GenerationConfig
from padlm.core.preferences import PSOUPS
from padlm.data.axes import SIDES
from padlm.evaluation import feedback
from padlm.profiles.features import parse_axes
from padlm.profiles.service import ProfileService
from padlm.profiles.store import open_store

WIDE = parse_axes("P1,P2,P3,format,energy")


def test_the_simulated_user_chooses_by_majority_of_its_axes_judges():
    target = ("P1A", "P2A", "P3A")  # simple (lower grade), concise (fewer words), friendly
    simple = {"expertise": 3.0, "informativeness": 50.0, "friendliness": 0.9}
    expert = {"expertise": 12.0, "informativeness": 20.0, "friendliness": 0.1}
    coin = random.Random(0)
    # P1 and P3 vote for the first answer, P2 for the second: 2 to 1
    assert feedback.taste_choice(target, simple, expert, coin) == 0
    assert feedback.taste_choice(("P1B", "P2B", "P3B"), simple, expert, coin) == 1
    # an axis whose judge scores both alike abstains; a tied vote is the coin's
    tied = dict(simple, friendliness=expert["friendliness"])
    flips = {feedback.taste_choice(("P1A", "P2A"), tied, expert, random.Random(seed))
             for seed in range(20)}
    assert flips == {0, 1}
    listed = {"list_lines": 1.0, "exclamations": 0.0}
    prose = {"list_lines": 0.0, "exclamations": 0.0}
    assert feedback.taste_choice(("prose", "calm"), listed, prose, coin) == 1


def test_simulated_users_and_the_preference_each_composition_decodes_with():
    users = feedback.simulated_users()
    assert len(users) == 16 and {u.group for u in users} == {"P-Soups"}
    wide = feedback.simulated_users(WIDE)
    free = [u for u in wide if u.group == "free-text"]
    assert len(wide) == 24 and len(free) == 8  # 4 combinations of format x energy, 2 choosers
    assert {u.target for u in free} == {(f, e) for f in ("bullets", "prose")
                                        for e in ("enthusiastic", "calm")}
    assert feedback.judged_axes() == ["format", "energy"]
    assert feedback.composition(("P1A", "P2B")) == "P1A+P2B"
    assert feedback.composition(("P1A", "bullets")) == \
        f"{PSOUPS['P1A']} {SIDES['bullets'].text}"


def test_replayed_sides_are_the_sides_the_profile_learned(tmp_path):
    service = ProfileService(open_store(f"sqlite:///{tmp_path / 'p.db'}"), TextFeatures())
    answers = [("Hi! Fun! Great!", "The matter is noted."), ("Short!", "A much longer and "
               "considerably more elaborate explanation."), ("Yay!", "Acknowledged.")]
    seen = {}
    for n, (chosen, rejected) in enumerate(answers, 1):
        service.choose_texts("t", "u", "q", chosen, rejected)
        seen[n] = service.decoding("t", "u")[0]
    replayed = feedback.replayed_sides(service.store.events("t", "u"), (0, 1, 3, 9))
    assert sorted(replayed) == [0, 1, 3]  # a checkpoint the profile has not reached: absent
    assert replayed[0] == []
    for n in (1, 3):
        assert "+".join(replayed[n]) == "+".join(seen[n].ids)
    service.store.close()


def test_decode_runs_each_distinct_input_once(tiny_engine):
    runs = []
    batch = tiny_engine.batch

    def counting(strategy):
        decoder = batch(strategy)
        run = decoder.run

        def counted(requests):
            runs.append(len(requests))
            return run(requests)

        decoder.run = counted
        return decoder

    tiny_engine.batch = counting
    config = GenerationConfig(max_new_tokens=4)
    items = [("Say hi.", "P1A"), ("Say hi.", "P1B"), ("Say hi.", "P1A"), ("Bye.", "P1A")]
    texts = feedback.decode(tiny_engine, "pad", items, config, batch_size=8)
    assert sum(runs) == 3 and texts[0] == texts[2] and len(texts) == 4
    alone = feedback.decode(tiny_engine, "pad", [items[1]], config, batch_size=8)
    assert alone == [texts[1]]


def test_a_whole_run_is_resumable_and_reports_each_group(tiny_engine, tmp_path):
    """Two rounds on the tiny model with the shipped reward heads, P-Soups and free-text
    axes; a second run plays nothing new and writes the same curve."""
    out = tmp_path / "run"
    config = GenerationConfig(max_new_tokens=6)
    first = feedback.run(tiny_engine, out, "pad", rounds=2, checkpoints=(0, 2), config=config,
                         limit=2, pool_dir=Path("data"), progress=False, axes=WIDE)
    assert first["axes"] == ["P1", "P2", "P3", "format", "energy"]
    assert set(first["groups"]) == {"P-Soups", "free-text"}
    assert [row["choices"] for row in first["curve"]] == [0, 2]
    assert first["curve"][0]["taste"]["win"] == 0.5  # no choice yet: base itself
    rounds = (out / feedback.ROUNDS_FILE).read_text("utf-8").splitlines()
    assert len(rounds) == 2 * 24
    assert all(len(json.loads(line)["texts"]) == 2 for line in rounds)
    table = (out / "feedback.md").read_text("utf-8")
    assert "Users with free-text targets" in table and (out / "feedback.png").exists()
    again = feedback.run(tiny_engine, out, "pad", rounds=2, checkpoints=(0, 2), config=config,
                         limit=2, pool_dir=Path("data"), progress=False, axes=WIDE)
    assert (out / feedback.ROUNDS_FILE).read_text("utf-8").splitlines() == rounds
    assert again["curve"] == first["curve"] and again["groups"] == first["groups"]
