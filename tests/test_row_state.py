"""A row's settings are parsed once, when it joins (``Strategy.admit`` -> ``row.state``),
not at every step: the number of parses does not grow with the tokens decoded."""

from __future__ import annotations

import pytest

from padlm import GenerationConfig, Personalizer
from padlm.orchestration import strategies
from padlm.orchestration.experts import Experts


@pytest.fixture(scope="module")
def engine(default_lm):
    return Personalizer(default_lm, persrm="identity")


@pytest.mark.parametrize(("strategy", "mix"), [("mix", "fixed:2,1,1"), ("mix", None),
                                               ("soups", "fixed:1,1,2")])
def test_row_settings_are_parsed_once_per_row(engine, monkeypatch, strategy, mix):
    parses = {"mix_weights": 0, "select": 0}
    parse_mix, select = strategies.mix_weights, Experts.select

    def counted_mix(setting):
        parses["mix_weights"] += 1
        return parse_mix(setting)

    def counted_select(self, preference):
        parses["select"] += 1
        return select(self, preference)

    monkeypatch.setattr(strategies, "mix_weights", counted_mix)
    monkeypatch.setattr(Experts, "select", counted_select)
    counts = []
    for tokens in (2, 10):
        parses.update(mix_weights=0, select=0)
        config = GenerationConfig(max_new_tokens=tokens, ignore_eos=True, mix=mix)
        engine.generate(["Name a fruit.", "Why is the sky blue?"], "P1A+P2B+P3A", strategy,
                        config)
        counts.append(dict(parses))
    assert counts[0] == counts[1] and counts[0]["select"] > 0, counts
