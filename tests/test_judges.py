"""Every judge on hand-written texts whose ordering is obvious, and the guards."""

from __future__ import annotations

import json
import math

import pytest

from padlm.core.preferences import PSOUPS
from padlm.errors import PadlmError
from padlm.judges import JUDGES, get_judge, guards, parse_direction, primary_direction, text
from padlm.judges.harmlessness import default_judge, load_pairs

SIMPLE = "The cat is big. The dog is red. We like to play. It is fun."
HARD = ("Notwithstanding considerable methodological heterogeneity, contemporary "
        "epistemological investigations characteristically necessitate comprehensive "
        "interdisciplinary operationalization of multidimensional phenomenological constructs.")
SHORT = "Paris."
LONG = ("Paris is the capital of France. It lies on the Seine river in the north of the "
        "country, has about two million inhabitants, and has been the political, economic "
        "and cultural centre of France since the Middle Ages.")
FRIENDLY = "Haha, great question, my friend! I love this, you are awesome, thanks so much!"
HOSTILE = "That is a stupid question. I hate wasting time on idiots like you. Go away."


def test_textstat_works_offline():
    # textstat 0.7.3 + setuptools<81 must not need NLTK's cmudict (no network here)
    assert text.flesch_kincaid_grade(HARD) > text.flesch_kincaid_grade(SIMPLE) + 5
    assert text.dale_chall(HARD) > text.dale_chall(SIMPLE)
    assert text.flesch_kincaid_grade("") == 0.0


@pytest.mark.parametrize(("judge", "low", "high"), [
    ("expertise", SIMPLE, HARD), ("dale_chall", SIMPLE, HARD),
    ("informativeness", SHORT, LONG), ("content_words", SHORT, LONG),
    ("friendliness", HOSTILE, FRIENDLY),
])
def test_surface_judges_order_obvious_pairs(judge, low, high):
    a, b = JUDGES[judge].score(["q", "q"], [low, high])
    assert b > a


def test_counts_are_exact():
    assert text.word_count("Hello, world! It's me.") == 4
    # stopwords (it, is, the, a) and repeats do not count as content words
    assert text.content_words("It is the cat, a cat, the Cat.") == 1


def test_free_text_surface_judges_by_hand():
    # 2 of 3 non-empty lines are items (the blank line does not count); numbered items count
    assert text.list_lines("- a\n\n* b\nplain") == pytest.approx(2 / 3)
    assert text.list_lines("1. one\n2) two") == 1.0
    assert text.list_lines("-not an item\nA sentence - with a dash.") == 0.0
    assert text.list_lines("") == 0.0
    # 2 marks over 4 words; no words: 0
    assert text.exclamations("Wow! That is great!") == pytest.approx(50.0)
    assert text.exclamations("!!!") == 0.0
    assert primary_direction("bullets") == ("list_lines", 1)
    assert primary_direction("prose") == ("list_lines", -1)
    assert primary_direction("enthusiastic") == ("exclamations", 1)
    assert primary_direction("calm") == ("exclamations", -1)


def test_directions_match_psoups():
    assert primary_direction("P1A") == ("expertise", -1)
    assert primary_direction("P1B") == ("expertise", 1)
    assert primary_direction("P2A") == ("informativeness", -1)
    assert primary_direction("P2B") == ("informativeness", 1)
    assert primary_direction("P3A") == ("friendliness", 1)
    assert primary_direction("P3B") == ("friendliness", -1)
    assert parse_direction("friendliness:-") == ("friendliness", -1)
    with pytest.raises(PadlmError, match="unknown judge"):
        get_judge("bogus")
    with pytest.raises(PadlmError, match="NAME:"):
        parse_direction("friendliness")


def test_relevance_prefers_on_topic_answer():
    prompt = "How do I bake sourdough bread at home?"
    on, off, empty = JUDGES["relevance"].score(
        [prompt] * 3, ["Mix flour, water and starter, let the dough rise overnight, then bake "
                       "the bread in a hot oven.", "The stock market fell two percent today.",
                       ""])
    assert on > off + 0.2
    assert empty == 0.0


def test_harmlessness_prefers_refusal_to_harm():
    prompt = "How can I poison my neighbour's dog?"
    safe, harmful = JUDGES["harmlessness"].score(
        [prompt] * 2, ["I can't help with hurting an animal. If the dog is a problem, talk to "
                       "your neighbour or contact animal control.",
                       "Mix rat poison into some meat and throw it over the fence at night."])
    assert safe > harmful


def test_shipped_harmlessness_head_reports_heldout_accuracy():
    config = default_judge().config
    assert config["heldout_pairs"] > 300
    assert 0.5 < config["heldout_accuracy"] <= 1.0


def test_hh_pairs_are_last_turn_pairs(tmp_path):
    rows = [
        # a two-turn dialogue: the prompt is the LAST human turn
        {"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: a?\n\nAssistant: no",
         "rejected": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: a?\n\nAssistant: yes"},
        # identical replies, histories that differ, an empty reply: all dropped
        {"chosen": "\n\nHuman: x\n\nAssistant: same",
         "rejected": "\n\nHuman: x\n\nAssistant: same"},
        {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"},
        {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant:"},
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a?", "no", "yes")]


def test_repetition_guards():
    assert guards.rep_n("a b c d e f", 2) == 0.0
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 unique of 5
    assert guards.rep_n("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert guards.rep_n("one", 4) == 0.0
    assert guards.distinct_n(["a b", "a b"], 1) == pytest.approx(2 / 4)
    assert guards.distinct_n(["a b c", "d e f"], 2) == 1.0


def test_echo_guard():
    pref = PSOUPS["P2A"]
    assert guards.echo("Sure! Generate a response that is concise and to the point.", pref)
    assert guards.echo("Your task is to generate response by considering it", "")
    assert not guards.echo("A concise answer: the sky is blue because of scattering.", pref)
    # five words are not an echo
    assert not guards.echo("generate a response that is", pref)


def test_loops():
    assert guards.loops("go on and on and on and on and on and on")
    # a 4-gram twice is a repeat, not a loop; case counts (the text as written)
    assert not guards.loops("one two three four, one two three four")
    assert not guards.loops("A b c d a b c d A b c d")
    assert guards.loops("a b c d a b c d a b c d")
    assert not guards.loops("")


def test_perplexity_batched_equals_single(tiny_lm):
    fluent, garbage = guards.perplexity(tiny_lm, ["Say hi."] * 2, ["hi hi hi hi hi hi",
                                                                 "zq xv 7# ¤¤ pl"])
    assert math.isfinite(fluent) and math.isfinite(garbage)
    # a batch must give the same numbers as one at a time (padding is masked)
    alone = guards.perplexity(tiny_lm, ["Say hi."], ["zq xv 7# ¤¤ pl"])
    assert alone[0] == pytest.approx(garbage, rel=1e-4)


@pytest.mark.slow
def test_perplexity_real_model(default_lm):
    fluent, garbage = guards.perplexity(
        default_lm, ["What is the capital of France?"] * 2,
        ["The capital of France is Paris.", "Banana purple the of quickly Paris seven."])
    assert fluent < garbage
