"""Profiles learned from choices: the service over a real SQLite store, the server's routes
(feedback, profiles, explore, tenants), and the real default model with the real reward
models."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import TextFeatures

from padlm.core.engine import Personalizer
from padlm.core.preferences import PSOUPS
from padlm.data.axes import SIDES, generation_text
from padlm.errors import PadlmError
from padlm.profiles.features import AxisFeatures, parse_axes
from padlm.profiles.learning import Posterior, explore_contrast
from padlm.profiles.profile import ProfileState, compose, explore_sides, learned_sides
from padlm.profiles.service import (
    LOCAL_TENANT,
    ProfileError,
    ProfileService,
    ResponseRef,
    TenantProfiles,
)
from padlm.profiles.store import open_store

HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def service(text_profiles):
    return text_profiles


FRIENDLY = "Hi there! Great question! Fun!"
COLD = "The question is noted and will be handled in due course by our staff."


def test_learned_sides_follow_the_sign_of_the_posterior():
    posterior = Posterior((0.7, -0.2, 0.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    assert learned_sides(posterior) == ["P1A", "P2B"]  # no lean on P3: no side
    assert learned_sides(posterior, skip=[0]) == ["P2B"]
    # an explore pair: opposite sides where contrasted, the profile's lean elsewhere
    assert explore_sides(posterior, (0, -1, 1)) == (["P1A", "P2B", "P3A"],
                                                    ["P1A", "P2A", "P3B"])
    assert explore_sides(posterior, (1, 0, 0)) == (["P1A", "P2B"], ["P1B", "P2B"])
    assert compose(["P1A", "P2B"], None).ids == ("P1A", "P2B")
    text = compose(["P1A"], "Answer in French.")
    assert text.ids is None and text.text.endswith("Answer in French.")
    assert not compose([], None)


def test_a_choice_moves_the_profile_to_the_chosen_side(service):
    service.remember("t", "alice", "r1", ["q", "q"], [FRIENDLY, COLD])
    body = service.choose("t", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    assert body["choices"] == 1 and body["version"] == 1
    assert body["axes"]["P3"]["p_side_a"] > 0.5  # friendly was chosen
    assert body["axes"]["P2"]["p_side_a"] > 0.5  # and it was the shorter one
    preference, state = service.decoding("t", "alice")
    assert "P3A" in preference.ids and "P2A" in preference.ids
    assert state["version"] == 1
    # another user of the same tenant, and the same user elsewhere, are untouched
    assert service.decoding("t", "bob")[0].ids is None
    assert service.decoding("other", "alice")[1]["choices"] == 0


def test_feedback_that_cannot_be_learned_from_changes_nothing(service):
    service.remember("t", "alice", "r1", ["q", "q"], [FRIENDLY, COLD])
    service.remember("t", "bob", "r2", ["q"], [COLD])
    service.choose("t", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    before = service.export("t", "alice")
    cases = [(ResponseRef("nope", 0), ResponseRef("r1", 1), 404),  # unknown id
             (ResponseRef("r1", 5), ResponseRef("r1", 1), 404),  # unknown choice
             (ResponseRef("r2", 0), ResponseRef("r1", 1), 403),  # bob's response
             (ResponseRef("r1", 0), ResponseRef("r1", 0), 400)]  # itself
    for chosen, rejected, status in cases:
        with pytest.raises(ProfileError) as refused:
            service.choose("t", "alice", chosen, rejected)
        assert refused.value.status == status
    with pytest.raises(ProfileError) as refused:  # another tenant's id is unknown there
        service.choose("elsewhere", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    assert refused.value.status == 404
    for bad in ("", " ", "x" * 300, "a\nb"):
        with pytest.raises(ProfileError):
            service.decoding("t", bad)
    assert service.export("t", "alice") == before


class WideFeatures(TextFeatures):
    """:class:`TextFeatures` plus format (list lines) and energy (exclamations)."""

    def __call__(self, prompts, responses):
        return [[*row, r.count("\n- ") / 2, r.count("!") / 2]
                for row, r in zip(super().__call__(prompts, responses), responses, strict=True)]


WIDE = "P1,P2,P3,format,energy"
LISTED = "Steps:\n- mix\n- bake\n- eat"


def test_profile_axes_are_checked():
    assert [axis.name for axis in parse_axes(WIDE)] == ["P1", "P2", "P3", "format", "energy"]
    for spec, message in (("P1,nope", "unknown profile axis nope"),
                          ("", "unknown profile axis"), ("P1,P1", "distinct"),
                          ("sassy", "unknown profile axis sassy")):  # held out: no heads
        with pytest.raises(PadlmError, match=message):
            parse_axes(spec)


def test_free_text_sides_compose_a_free_text_preference():
    mixed = compose(["P1A", "bullets"], None)
    assert mixed.ids is None and mixed.text == f"{PSOUPS['P1A']} {SIDES['bullets'].text}"
    assert compose(["P1A", "bullets"], None, instructed=True).text == \
        f"{generation_text('P1A')} {generation_text('bullets')}"
    assert compose(["P1A", "P2B"], None).ids == ("P1A", "P2B")  # presets keep their ids


def test_a_profile_learns_free_text_axes_and_keeps_them_across_axis_sets(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    narrow = ProfileService(open_store(url), TextFeatures())
    narrow.remember("t", "alice", "r1", ["q", "q"], [FRIENDLY, COLD])
    learned = narrow.choose("t", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    wide = ProfileService(narrow.store, WideFeatures(), axes=parse_axes(WIDE))
    # read with more axes: what was learned stays, the new axes start at the prior
    shown = wide.show("t", "alice")
    for axis in ("P1", "P2", "P3"):
        assert shown["axes"][axis] == learned["axes"][axis]
    assert shown["axes"]["format"] == {"sides": ["bullets", "prose"], "weight": 0.0,
                                       "sd": 1.0, "p_side_a": 0.5}
    # a response remembered under three axes cannot teach five
    narrow.remember("t", "alice", "r2", ["q", "q"], [FRIENDLY, COLD])
    with pytest.raises(ProfileError, match="other profile axes") as refused:
        wide.choose("t", "alice", ResponseRef("r2", 0), ResponseRef("r2", 1))
    assert refused.value.status == 409
    wide.remember("t", "alice", "r3", ["q", "q"], [LISTED + "!!", "Mix, bake and eat."])
    body = wide.choose("t", "alice", ResponseRef("r3", 0), ResponseRef("r3", 1))
    assert body["axes"]["format"]["p_side_a"] > 0.5 and body["axes"]["energy"]["p_side_a"] > 0.5
    preference = wide.decoding("t", "alice")[0]
    assert SIDES["bullets"].text in preference.text and preference.ids is None
    # the explore pair of a fresh profile differs on all five axes
    (a, b), explored = wide.exploring("t", "bob")
    assert explored["explore"]["axes"] == ["P1", "P2", "P3", "format", "energy"]
    assert generation_text("bullets") in a.text and generation_text("prose") in b.text
    # and a narrower reader refuses the wider profile rather than dropping what it learned
    export = wide.export("t", "alice")
    with pytest.raises(ProfileError, match="--profile-axes P1,P2,P3,format,energy") as refused:
        narrow.show("t", "alice")
    assert refused.value.status == 409
    assert wide.export("t", "alice") == export
    narrow.store.close()


def test_expired_responses_are_not_learned_from(tmp_path):
    service = ProfileService(open_store(f"sqlite:///{tmp_path / 'p.db'}"), TextFeatures(),
                             ttl_s=0.05)
    service.remember("t", "alice", "r1", ["q", "q"], [FRIENDLY, COLD])
    time.sleep(0.1)
    with pytest.raises(ProfileError, match="expired"):
        service.choose("t", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    service.store.close()


def test_a_thumb_compares_with_what_the_user_rated_before(service):
    service.remember("t", "alice", "r1", ["q", "q"], [COLD, FRIENDLY])
    first = service.rate("t", "alice", ResponseRef("r1", 0), up=False)
    # the first thumb has nothing to compare with: it teaches nothing
    assert all(axis["weight"] == 0 for axis in first["axes"].values())
    second = service.rate("t", "alice", ResponseRef("r1", 1), up=True)
    assert second["axes"]["P3"]["p_side_a"] > 0.5 and second["choices"] == 2


def test_explore_pairs_differ_where_a_choice_teaches_the_most(service):
    (a, b), fresh = service.exploring("t", "alice")
    # a fresh profile is unsure of everything: the two answers differ on every axis
    assert fresh["explore"]["axes"] == ["P1", "P2", "P3"]
    assert fresh["explore"]["sides"] == [["P1A", "P2A", "P3A"], ["P1B", "P2B", "P3B"]]
    assert (a.ids, b.ids) == (("P1A", "P2A", "P3A"), ("P1B", "P2B", "P3B"))
    # each side with the sampler's stronger instruction, so the two answers differ clearly
    assert a.text == " ".join(generation_text(side) for side in a.ids)
    service.remember("t", "alice", "r1", ["q", "q"], [FRIENDLY, COLD])
    service.choose("t", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    (a, b), body = service.exploring("t", "alice")
    record = service.store.get("t", "alice")
    contrast = explore_contrast(ProfileState.from_json(record.state).posterior)
    axes = ("P1", "P2", "P3")
    assert body["explore"]["axes"] == [a for a, x in zip(axes, contrast, strict=True) if x]
    assert contrast != (1, 1, 1)  # that direction was just asked
    assert sorted(set(a.ids) ^ set(b.ids)) == sorted(
        side for sides in body["explore"]["sides"] for side in sides)
    assert body["explore"]["preferences"] == [a.text, b.text]


def test_reset_keeps_the_text_and_delete_forgets_everything(service):
    service.remember("t", "alice", "r1", ["q", "q"], [FRIENDLY, COLD])
    service.choose("t", "alice", ResponseRef("r1", 0), ResponseRef("r1", 1))
    service.set_text("t", "alice", "Answer in French.")
    assert service.decoding("t", "alice")[0].text.endswith("Answer in French.")
    reset = service.reset("t", "alice")
    assert reset["choices"] == 0 and reset["text"] == "Answer in French."
    assert reset["preference"] == "Answer in French."
    assert service.delete("t", "alice") is True
    assert service.store.get("t", "alice") is None and not service.store.events("t", "alice")
    assert service.store.recall("t", "r1", 0) is None
    assert service.delete("t", "alice") is False


def test_the_python_api_decodes_for_a_users_profile(tiny_lm, service):
    service.choose_texts(LOCAL_TENANT, "alice", "q", FRIENDLY, COLD)
    engine = Personalizer(tiny_lm, persrm="identity", profiles=TenantProfiles(service))
    learned = service.decoding(LOCAL_TENANT, "alice")[0]
    config_kwargs = {"strategy": "prompt"}
    by_user = engine.generate(["Say hi."], user="alice", **config_kwargs)[0].text
    stated = engine.generate(["Say hi."], learned.text, **config_kwargs)[0].text
    assert by_user == stated
    # a stated preference wins over the profile
    assert engine.generate(["Say hi."], "P1B", user="alice", **config_kwargs)[0].text == \
        engine.generate(["Say hi."], "P1B", **config_kwargs)[0].text
    with pytest.raises(Exception, match="needs profiles"):
        Personalizer(tiny_lm, persrm="identity").generate(["Say hi."], user="alice")


# ---- the server ----------------------------------------------------------------------------

def chat(server, body, key=None, timeout=120):
    headers = {"authorization": f"Bearer {key}"} if key else None
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=timeout)


def feedback(server, body, key=None):
    headers = {"authorization": f"Bearer {key}"} if key else None
    return httpx.post(f"{server.url}/v1/feedback", json=body, headers=headers, timeout=60)


def profile(server, user, key=None):
    headers = {"authorization": f"Bearer {key}"} if key else None
    return httpx.get(f"{server.url}/v1/profiles/{user}", headers=headers, timeout=60).json()


def test_explore_feedback_and_the_learned_profile_over_http(serve, service):
    server, _ = serve(profiles=service)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    pair = client.chat.completions.create(
        model=server.model, messages=HI, max_tokens=6, n=2, user="alice",
        extra_body={"padlm": {"explore": True}})
    meta = pair.model_extra["padlm"]["profile"]
    assert meta["version"] == 0 and meta["explore"]["axes"] == ["P1", "P2", "P3"]
    assert len(pair.choices) == 2
    learned = feedback(server, {"user": "alice", "chosen": {"id": pair.id, "index": 1},
                                "rejected": {"id": pair.id, "index": 0}})
    assert learned.status_code == 200, learned.text
    assert learned.json()["choices"] == 1 and profile(server, "alice")["version"] == 1
    # the choice said P1B over P1A only if the texts differ that way: the features decide,
    # and the profile decodes with whatever it learned
    after = chat(server, {"messages": HI, "max_tokens": 4, "user": "alice"}).json()
    assert after["padlm"]["profile"]["version"] == 1
    assert after["padlm"]["preference"] == learned.json()["preference"]
    # an explicit preference wins, and says no profile was used
    stated = chat(server, {"messages": HI, "max_tokens": 4, "user": "alice",
                           "preference": "P3A"}).json()
    assert stated["padlm"]["preference"].startswith("Generate") and \
        "profile" not in stated["padlm"]
    # its answer still teaches alice's profile (a thumb on it is learned from)
    thumb = feedback(server, {"user": "alice", "response": {"id": stated["id"]},
                              "rating": "up"})
    assert thumb.status_code == 200 and thumb.json()["choices"] == 2


def test_malformed_or_foreign_feedback_is_refused_and_changes_nothing(serve, service):
    server, _ = serve(profiles=service)
    first = chat(server, {"messages": HI, "max_tokens": 4, "n": 2, "user": "alice"}).json()
    other = chat(server, {"messages": HI, "max_tokens": 4, "user": "bob"}).json()
    one = {"id": first["id"], "index": 0}
    cases = [
        ({"chosen": one, "rejected": {"id": first["id"], "index": 1}}, 422, "user"),
        ({"user": "alice"}, 400, "chosen"),
        ({"user": "alice", "chosen": one}, 400, "rejected"),
        ({"user": "alice", "response": one, "rating": "meh"}, 400, "rating"),
        ({"user": "alice", "chosen": one, "rejected": one, "response": one,
          "rating": "up"}, 400, "chosen"),
        ({"user": "alice", "chosen": one, "rejected": {"id": "chatcmpl-nope"}}, 404,
         "rejected"),
        ({"user": "alice", "chosen": one, "rejected": {"id": other["id"]}}, 403,
         "rejected"),
        ({"user": "alice", "chosen": {"id": first["id"], "index": -1}, "rejected": one},
         422, "chosen.index"),
        ({"user": "", "response": one, "rating": "up"}, 400, "user"),
    ]
    for body, status, param in cases:
        refused = feedback(server, body)
        assert refused.status_code == status, (body, refused.text)
        error = refused.json()["error"]
        assert error["param"] == param and error["message"], (body, error)
    not_json = httpx.post(f"{server.url}/v1/feedback", content=b"{", timeout=30,
                          headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert profile(server, "alice")["version"] == 0 and profile(server, "bob")["version"] == 0


def test_explore_is_refused_where_it_cannot_work(serve, service, tiny_lm):
    server, _ = serve(profiles=service)
    cases = [({"n": 2}, "needs user"), ({"n": 1, "user": "a"}, "needs n=2"),
             ({"n": 2, "user": "a", "preference": "P1A"}, "takes no preference")]
    for extra, message in cases:
        refused = chat(server, {"messages": HI, "max_tokens": 2,
                                "padlm": {"explore": True}, **extra})
        assert refused.status_code == 400 and message in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "padlm.explore"
    bare, _ = serve()
    refused = chat(bare, {"messages": HI, "max_tokens": 2, "n": 2, "user": "a",
                          "padlm": {"explore": True}})
    assert refused.status_code == 400 and "profiles" in refused.json()["error"]["message"]
    assert feedback(bare, {"user": "a", "response": {"id": "x"}, "rating": "up"}
                    ).status_code == 404


def test_a_profile_text_from_the_users_history(serve, service, default_lm):
    """The served model (the real default one: the tiny random model writes only newlines,
    which the route refuses) writes the profile text from the user's messages."""
    from padlm.server.app import ServerThread, create_app

    app = create_app(Personalizer(default_lm, persrm="identity"), profiles=service)
    with ServerThread(app) as real:
        written = httpx.post(f"{real.url}/v1/profiles/alice/history", json={"messages": [
            "explain like im 5", {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "short answers please"}]}, timeout=300)
    assert written.status_code == 200, written.text
    text = written.json()["text"]
    assert text and written.json()["preference"] == text
    assert service.store.get("public", "alice").text == text
    server, _ = serve(profiles=service)
    url = f"{server.url}/v1/profiles/bob/history"
    empty = httpx.post(url, json={"messages": ["hi"]}, timeout=120)
    assert empty.status_code == 422 and "empty profile" in empty.text
    assert service.store.get("public", "bob") is None  # nothing written
    for body, status in (({"messages": []}, 422),
                         ({"messages": [{"role": "assistant", "content": "hi"}]}, 400),
                         ({"messages": "hello"}, 422)):
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == status, refused.text
        assert refused.json()["error"]["param"] == "messages"
    bare, _ = serve()
    assert httpx.post(f"{bare.url}/v1/profiles/alice/history", json={"messages": ["hi"]},
                      timeout=30).status_code == 404


def test_tenants_never_see_each_others_profiles(serve, service):
    server, _ = serve(profiles=service, api_keys=("key-one", "key-two"))
    mine = chat(server, {"messages": HI, "max_tokens": 4, "n": 2, "user": "alice"},
                key="key-one").json()
    choice = {"user": "alice", "chosen": {"id": mine["id"], "index": 0},
              "rejected": {"id": mine["id"], "index": 1}}
    assert feedback(server, choice, key="key-two").status_code == 404
    assert profile(server, "alice", key="key-two")["version"] == 0
    deleted = httpx.delete(f"{server.url}/v1/profiles/alice", timeout=30,
                           headers={"authorization": "Bearer key-two"})
    assert deleted.json()["deleted"] is False
    assert feedback(server, choice, key="key-one").status_code == 200
    assert profile(server, "alice", key="key-one")["version"] == 1


def test_delete_forgets_the_user_and_their_responses(serve, service):
    server, _ = serve(profiles=service)
    slashed = chat(server, {"messages": HI, "max_tokens": 2, "user": "team/alice"})
    assert profile(server, "team/alice")["user"] == "team/alice"  # a name with a slash
    assert httpx.delete(f"{server.url}/v1/profiles/team/alice", timeout=30
                        ).json()["deleted"] is True  # its remembered response
    assert service.store.recall("public", slashed.json()["id"], 0) is None
    first = chat(server, {"messages": HI, "max_tokens": 4, "n": 2, "user": "alice"}).json()
    choice = {"user": "alice", "chosen": {"id": first["id"], "index": 0},
              "rejected": {"id": first["id"], "index": 1}}
    assert feedback(server, choice).status_code == 200
    deleted = httpx.delete(f"{server.url}/v1/profiles/alice", timeout=30)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert feedback(server, choice).status_code == 404  # its responses went too
    assert profile(server, "alice")["version"] == 0


def test_a_streamed_response_is_remembered_and_names_its_profile(serve, service):
    server, _ = serve(profiles=service)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=server.model, messages=HI, max_tokens=4, n=2, user="alice", stream=True))
    last = chunks[-1].model_extra["padlm"]
    assert last["profile"]["user"] == "alice" and not chunks[-1].choices
    rid = chunks[0].id
    assert feedback(server, {"user": "alice", "response": {"id": rid, "index": 1},
                             "rating": "down"}).status_code == 200


def test_a_profile_never_changes_another_users_output(serve, service):
    service.choose_texts("public", "bob", "q", FRIENDLY, COLD)  # bob's profile leans
    server, _ = serve(profiles=service)
    body = {"messages": HI, "max_tokens": 8, "user": "alice", "strategy": "prompt"}
    alone = chat(server, body).json()["choices"][0]["message"]["content"]
    results = {}

    def send(name, request):
        results[name] = chat(server, request).json()

    threads = [threading.Thread(target=send, args=("alice", body)),
               threading.Thread(target=send, args=("bob", {**body, "user": "bob"}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["alice"]["choices"][0]["message"]["content"] == alone
    assert results["bob"]["padlm"]["preference"] is not None
    assert results["alice"]["padlm"]["preference"] is None


# ---- the real default model and reward models ----------------------------------------------

def test_real_model_learns_from_a_choice_between_real_answers(default_lm, tmp_path):
    """SmolLM2 answers with two stated preferences; the shipped reward models give the
    features; choosing the concise answer moves the profile to P2A, and the next
    generation for the user decodes with it."""
    service = ProfileService(open_store(f"sqlite:///{tmp_path / 'p.db'}"), AxisFeatures())
    engine = Personalizer(default_lm, persrm="identity", profiles=TenantProfiles(service))
    prompt = "What is a volcano?"
    short, long = (engine.generate([prompt], p, "prompt")[0].text for p in ("P2A", "P2B"))
    assert len(short.split()) < len(long.split())
    body = service.choose_texts(LOCAL_TENANT, "alice", prompt, short, long)
    assert body["axes"]["P2"]["p_side_a"] > 0.5, body
    learned = service.decoding(LOCAL_TENANT, "alice")[0]
    assert "P2A" in learned.ids
    assert engine.generate([prompt], None, "prompt", user="alice")[0].text == \
        engine.generate([prompt], learned, "prompt")[0].text
    service.store.close()


def test_shipped_heads_read_the_free_text_axes():
    """The real MiniLM and the shipped heads (assets/profile-rewards): a listed answer leans
    to bullets, an exclamatory one to enthusiastic; the P-Soups columns are the PCM's."""
    features = AxisFeatures(parse_axes(WIDE))
    prompt = "How do I make tea?"
    texts = ["- Boil water.\n- Add the tea bag.\n- Wait three minutes.",
             "Boil some water, add the tea bag and wait about three minutes before drinking.",
             "Oh wow, tea time! It's so easy and so much fun! You'll love it!",
             "Boil water, steep the tea for three minutes, then remove the bag."]
    listed, prose, excited, calm = features([prompt] * 4, texts)
    assert listed[3] > prose[3]  # format: side A is bullets
    assert excited[4] > calm[4]  # energy: side A is enthusiastic
    assert AxisFeatures()([prompt], texts[3:])[0] == pytest.approx(calm[:3], abs=1e-5)
