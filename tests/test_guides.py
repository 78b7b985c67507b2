"""Guides that travel: a PersRM or guide model of its own steering a base model.

The checks that say the lock-step guide stream is right: a guide equal to the base with the
base as reference reproduces the shared-backbone PAD token for token (tiny and real model);
a separate guide's KV-cached decoding equals a brute-force loop that recomputes both models
over the whole sequence at every step; each reward reference is the rule it names; and
nothing silently becomes the identity.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoints import save_causal_lm
from test_decoding import perturbed_persrm
from transformers import LlamaConfig, LlamaForCausalLM

from padlm.core import guidance
from padlm.core.config import GenerationConfig
from padlm.core.engine import Personalizer
from padlm.core.guides import (
    PersRMSource,
    default_persrm_dir,
    load_persrm,
    resolve_persrm,
)
from padlm.core.models import LoadedModel
from padlm.core.persrm import PersonalizedRewardModel
from padlm.core.preferences import parse_preference
from padlm.core.prompting import render
from padlm.core.strategies import DEFAULT_TOP_K
from padlm.errors import PadlmError

PREFERENCE = "P1A"
PROMPTS = ["Describe a cat.", "What is the capital of France?", "Name three colours."]
GREEDY = GenerationConfig(max_new_tokens=10, ignore_eos=True)


def as_separate_guide(persrm: PersonalizedRewardModel, guide: LoadedModel,
                      reference: str) -> PersonalizedRewardModel:
    """The same head, run on ``guide`` as a separate model with its own stream."""
    return PersonalizedRewardModel(persrm.config, persrm.head, guide=guide, reference=reference)


@pytest.mark.parametrize("trained", ["conditioned", "unconditioned"])
def test_a_guide_equal_to_the_base_reproduces_shared_backbone_pad(tiny_lm, trained):
    shared = perturbed_persrm(tiny_lm, scale=0.5)
    shared.config.reference = trained
    separate = as_separate_guide(shared, tiny_lm, shared.reference)
    assert separate.separate and shared.shares_backbone
    pad = Personalizer(tiny_lm, persrm=shared).generate(PROMPTS, PREFERENCE, "pad", GREEDY)
    guided = Personalizer(tiny_lm, persrm=separate).generate(PROMPTS, PREFERENCE, "pad", GREEDY)
    assert [g.tokens for g in guided] == [g.tokens for g in pad]
    assert len({tuple(g.tokens) for g in pad}) > 1


def test_the_shipped_persrm_as_a_separate_guide_of_its_own_model_matches_pad(default_lm):
    """The real default model and its shipped PersRM: the separate-guide path (a second
    stream, the head on the guide's own hidden states) gives PAD's tokens."""
    shipped = load_persrm("default", default_lm)
    assert shipped.shares_backbone and shipped.reference == "base-unconditioned"
    config = GenerationConfig(max_new_tokens=16)
    prompts = PROMPTS[:2]
    pad = Personalizer(default_lm, persrm=shipped).generate(prompts, "P2A", "pad", config)
    separate = as_separate_guide(shipped, default_lm, "base-unconditioned")
    guided = Personalizer(default_lm, persrm=separate).generate(prompts, "P2A", "pad", config)
    assert [g.tokens for g in guided] == [g.tokens for g in pad]


def full_logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].float()


def brute_force_pad(base: LoadedModel, guide: LoadedModel, prompt: str, preference: str,
                    steps: int, weight: float, reference: str) -> list[int]:
    """Greedy PAD with a separate guide, recomputing both models over the whole sequence at
    every step (no cache): ``z_b + w (log softmax_K z_G(s,p) - log softmax_K z_ref)``."""
    with_preference = render(base.tokenizer, prompt, preference, "user-prefix")
    guide_with = render(guide.tokenizer, prompt, preference, "user-prefix")
    guide_without = render(guide.tokenizer, prompt, "", "user-prefix")
    tokens: list[int] = []
    for _ in range(steps):
        z_b = full_logits(base, with_preference + tokens)
        candidates = z_b.topk(DEFAULT_TOP_K).indices
        reward = full_logits(guide, guide_with + tokens)[candidates].log_softmax(-1)
        if reference == "guide-unconditioned":
            reward = reward - full_logits(guide, guide_without + tokens)[candidates].log_softmax(-1)
        elif reference == "base":
            reward = reward - z_b[candidates].log_softmax(-1)
        tokens.append(int(candidates[(z_b[candidates] + weight * reward).argmax()]))
    return tokens


@pytest.mark.parametrize("reference", ["guide-unconditioned", "none", "base"])
def test_a_separate_guide_equals_recomputing_both_models_every_step(tiny_lm, guide_dir,
                                                                   reference):
    engine = Personalizer(tiny_lm, persrm=str(guide_dir), reference=reference)
    assert engine.persrm.separate and engine.persrm.reference == reference
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, weight=50.0)
    got = engine.generate(PROMPTS[:2], PREFERENCE, "pad", config)
    text = parse_preference(PREFERENCE).text
    for prompt, generation in zip(PROMPTS[:2], got, strict=True):
        assert generation.tokens == brute_force_pad(
            tiny_lm, engine.persrm.guide, prompt, text, 8, 50.0, reference)


def test_rows_with_different_references_share_a_batch(tiny_lm, guide_dir):
    """A guide model runs guide-unconditioned (its own), none and base in one batch: each row
    equals that row decoded alone; a reference the engine has no lane for is refused."""
    engine = Personalizer(tiny_lm, persrm=str(guide_dir))
    assert engine.persrm.reference == "guide-unconditioned"
    configs = [GenerationConfig(max_new_tokens=8, ignore_eos=True, weight=50.0, reference=r)
               for r in ("guide-unconditioned", "none", "base")]
    requests = [engine.request(PROMPTS[0], PREFERENCE, c) for c in configs]
    together = engine.batch("pad").run(requests)
    alone = [engine.batch("pad").run([r])[0] for r in requests]
    assert [row.tokens for row in together] == [row.tokens for row in alone]
    assert len({tuple(row.tokens) for row in alone}) > 1
    with pytest.raises(PadlmError, match="compares the guide .* with itself"):
        engine.generate(PROMPTS[:1], PREFERENCE, "pad", GenerationConfig(reference="guide"))
    with pytest.raises(PadlmError, match="needs a lane this engine's pad does not run"):
        engine.generate(PROMPTS[:1], PREFERENCE, "pad",
                        GenerationConfig(reference="base-unconditioned"))


def test_a_persrm_trained_on_another_model_runs_as_a_named_separate_guide(
        tiny_lm, guide_dir, tmp_path, caplog):
    persrm = PersonalizedRewardModel.identity(str(guide_dir), 48)
    with torch.no_grad():
        persrm.head.weight.add_(0.3 * torch.randn(48, 48, generator=torch.Generator()
                                                  .manual_seed(3)))
    persrm.save(tmp_path / "persrm")
    with caplog.at_level(logging.INFO, logger="padlm.core.guides"):
        engine = Personalizer(tiny_lm, persrm=str(tmp_path / "persrm"))
        loaded = engine.persrm
    assert loaded.separate and loaded.reference == "guide"  # its own backbone, as trained
    assert any("runs as a separate guide" in r.message and str(guide_dir) in r.message
               for r in caplog.records)
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, weight=50.0)
    pad = engine.generate(PROMPTS[:2], PREFERENCE, "pad", config)
    prompted = engine.generate(PROMPTS[:2], PREFERENCE, "prompt", config)
    assert [g.tokens for g in pad] != [g.tokens for g in prompted]


def test_the_resolver_says_what_a_spec_names_without_loading_it(tiny_lm, guide_dir, tmp_path,
                                                                monkeypatch):
    """Every engine reads ``--persrm`` through ``resolve_persrm``: the kind, the directory,
    the config and the model it was trained on, whether it is a head on this very model; a
    path to nothing is refused only when the PersRM is needed."""
    own = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    own.config.placement = "bracket"
    own.save(tmp_path / "own")
    PersonalizedRewardModel.identity(str(guide_dir), 48).save(tmp_path / "other")
    assert resolve_persrm(None, tiny_lm.name) == PersRMSource(None, "identity")
    assert resolve_persrm("identity", tiny_lm.name) == PersRMSource("identity", "identity")
    source = resolve_persrm(str(tmp_path / "own"), tiny_lm.name)
    assert source == PersRMSource(str(tmp_path / "own"), "padlm", tmp_path / "own",
                                  source.config, tiny_lm.name, True)
    assert source.config.placement == "bracket"
    other = resolve_persrm(str(tmp_path / "other"), tiny_lm.name)
    assert (other.kind, other.base_model, other.shares_backbone) == (
        "padlm", str(guide_dir), False)
    assert resolve_persrm(str(guide_dir), tiny_lm.name) == PersRMSource(
        str(guide_dir), "foreign", guide_dir)  # read when loaded: inspecting reads weights
    assert resolve_persrm("org/some-model", tiny_lm.name) == PersRMSource(
        "org/some-model", "guide", base_model="org/some-model")
    missing = resolve_persrm(str(tmp_path / "nowhere"), tiny_lm.name)
    assert missing.kind == "missing"
    with pytest.raises(PadlmError, match="nowhere does not exist"):
        missing.require()
    # ``default``: the first preferred shipped PersRM trained on this model, else the first
    shipped = resolve_persrm("default", "SmolLM2-135M-Instruct")
    assert shipped.directory == default_persrm_dir("default") and shipped.shares_backbone
    one_lane = ("conditioned", "default")
    assert resolve_persrm("default", "SmolLM2-135M-Instruct", one_lane).directory == \
        default_persrm_dir("conditioned")
    elsewhere = resolve_persrm("default", tiny_lm.name, one_lane)
    assert elsewhere.directory == default_persrm_dir("conditioned")
    assert elsewhere.base_model == "SmolLM2-135M-Instruct" and not elsewhere.shares_backbone
    assert resolve_persrm("default", tiny_lm.name).directory == default_persrm_dir("default")
    monkeypatch.setattr("padlm.core.guides.default_persrm_dir", lambda name: None)
    with pytest.raises(PadlmError, match="this build ships no PersRM 'conditioned'"):
        resolve_persrm("conditioned", tiny_lm.name)


def test_the_shipped_persrm_steers_another_model_of_its_tokenizer_as_a_guide(tiny_lm):
    """``--persrm default`` on another model is never the identity: the tiny model shares
    SmolLM2's tokenizer, so the shipped PersRM runs beside it as a separate guide."""
    engine = Personalizer(tiny_lm)
    assert engine.persrm.separate
    assert engine.persrm.guide.name == "SmolLM2-135M-Instruct"
    assert not engine.persrm.head.is_identity()


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory) -> Path:
    """A model whose tokenizer is not SmolLM2's (100 word-level tokens)."""
    directory = tmp_path_factory.mktemp("other")
    save_causal_lm(directory)
    return directory


def test_the_shipped_persrm_is_refused_for_a_model_of_another_tokenizer(other_tokenizer_dir):
    engine = Personalizer(str(other_tokenizer_dir))
    with pytest.raises(PadlmError) as refused:
        engine.check("pad", GenerationConfig())
    message = str(refused.value)
    assert "SmolLM2-135M-Instruct" in message and str(other_tokenizer_dir) in message
    assert "49152" in message and "100" in message
    engine.check("prompt", GenerationConfig())  # strategies without the PersRM still run
    served = engine.served_model()
    assert served.persrm is None and "pad" not in served.strategies  # a server defaults to prompt
    assert "prompt" in served.strategies


def test_the_cli_refuses_pad_with_a_guide_of_another_tokenizer_in_one_line(other_tokenizer_dir):
    result = subprocess.run(
        [sys.executable, "-c", "from padlm.cli import main; main()", "generate", "Hi",
         "--model", str(other_tokenizer_dir), "--strategy", "pad", "--preference", "P1A"],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "SmolLM2-135M-Instruct" in result.stderr and "tokenizer" in result.stderr


def test_references_that_cannot_run_are_refused_before_decoding(tiny_lm):
    shared = perturbed_persrm(tiny_lm, scale=0.5)
    with pytest.raises(PadlmError, match="needs a separate guide model"):
        Personalizer(tiny_lm, persrm=shared, reference="none").check("pad", GenerationConfig())
    with pytest.raises(PadlmError, match="reference must be one of"):
        Personalizer(tiny_lm, persrm=shared, reference="sideways")
    with pytest.raises(PadlmError, match="PersRM strategies"):
        Personalizer(tiny_lm, persrm=shared).check("prompt", GenerationConfig(reference="base"))
    # on a shared backbone "guide" is the base model: the same rule
    assert Personalizer(tiny_lm, persrm=shared, reference="guide").persrm.reference == "base"


def test_a_guide_scores_only_the_candidates_its_vocabulary_holds():
    """A base candidate beyond the guide's shared vocabulary gets no reward."""
    candidates = torch.tensor([[4, 2, 9]])
    valid = torch.tensor([[True, True, True]])
    scoring, scored = guidance.scoreable_candidates(candidates, valid, 5)
    assert scoring.tolist() == [[4, 2, 4]] and scored.tolist() == [[True, True, False]]
    guide = torch.tensor([[1.0, 3.0, 100.0]])
    reward = guidance.pad_token_reward(None, guide, scored)
    expected = torch.tensor([1.0, 3.0]).log_softmax(-1)
    assert torch.allclose(reward[0, :2], expected) and reward[0, 2] == 0


def test_the_guide_is_listed_by_the_server_and_references_are_per_request(tiny_lm, guide_dir):
    from openai import BadRequestError, OpenAI

    from padlm.server.app import ServerThread, create_app

    engine = Personalizer(tiny_lm, persrm=str(guide_dir))
    with ServerThread(create_app(engine)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        card = client.models.list().data[0]
        assert card.model_extra["padlm"]["guide"] == str(guide_dir)

        def ask(reference):
            return client.chat.completions.create(
                model=card.id, messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=6, extra_body={"preference": PREFERENCE, "strategy": "pad",
                                          "pad": {"reference": reference, "weight": 3.0}})
        alone = engine.generate(PROMPTS[:1], PREFERENCE, "pad", GenerationConfig(
            max_new_tokens=6, weight=3.0, reference="none"))[0]
        assert ask("none").choices[0].message.content == alone.text
        with pytest.raises(BadRequestError) as refused:
            ask("base-unconditioned")
        error = refused.value.body
        assert error["param"] == "pad.reference" and "start it with" in error["message"]


def test_a_pad_released_checkpoint_steers_through_the_resolver(tiny_lm, tmp_path):
    """PAD's released layout (a causal LM and ``value_head.safetensors``) as ``--persrm``:
    reference base, its head read as saved."""
    from safetensors.torch import save_file

    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_lm.tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True)).save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    weight = torch.eye(32) + 0.2 * torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    save_file({"pretrained_model.v_head.summary.weight": weight,
               "pretrained_model.v_head.summary.bias": torch.zeros(32)},
              str(tmp_path / "value_head.safetensors"))
    engine = Personalizer(tiny_lm, persrm=str(tmp_path))
    assert engine.persrm.reference == "base" and engine.persrm.separate
    assert torch.equal(engine.persrm.head.weight.data, weight)
    summary = json.loads(json.dumps(engine.persrm.config.training))
    assert summary == {"stage": "imported", "layout": "pad-released"}
    assert engine.generate(PROMPTS[:1], PREFERENCE, "pad", GREEDY)[0].new_tokens == 10


def test_token_rewards_follow_each_rows_reference(default_lm):
    """The playground's token view on the shipped PersRM (its own reference
    base-unconditioned, a second lane): a row that asks for reference base gets rewards
    against lane 0, the others against the preference-free lane; none is left out."""
    import httpx

    from padlm.server.app import ServerThread, create_app

    engine = Personalizer(default_lm, persrm="default")
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4,
            "stream": True, "preference": "P2A", "strategy": "pad", "token_rewards": True,
            "ignore_eos": True}
    rewards = {}
    with ServerThread(create_app(engine)) as server:
        for reference in (None, "base"):
            sent = {**body, **({"pad": {"reference": reference}} if reference else {})}
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=sent,
                              timeout=120) as response:
                events = [line[6:] for line in response.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            rewards[reference] = [json.loads(e)["padlm"]["reward"] for e in events
                                  if "padlm" in json.loads(e)]
    assert all(len(r) == 4 and all(isinstance(x, float) for x in r) for r in rewards.values())
    assert rewards[None] != rewards["base"]
