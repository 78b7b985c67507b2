"""The decode loop: caching, batching, seeds, continuous batching and every strategy."""

import copy
import re
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from padlm import GenerationConfig, Personalizer
from padlm.core import guidance
from padlm.core.decoding import Request
from padlm.core.models import eos_ids
from padlm.core.persrm import ADAPTER_NAME, PersonalizedRewardModel
from padlm.core.preferences import Preference
from padlm.core.prompting import preference_token_ids, render
from padlm.core.registry import echo_guard_refusal, strategy_names
from padlm.core.strategies import (
    ArgsStrategy,
    ImplicitRewardScorer,
    Scored,
    SequenceScorer,
)
from padlm.errors import PadlmError
from padlm.orchestration.scoring import DimensionScorer

PREFERENCE = "P1A"


def perturbed_persrm(lm, scale=0.05, seed=0) -> PersonalizedRewardModel:
    """A PersRM whose head is far enough from the identity to change PAD's choices."""
    persrm = PersonalizedRewardModel.identity(lm.name, lm.model.config.hidden_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = persrm.head.weight.shape[0]
        persrm.head.weight.add_(scale * torch.randn(d, d, generator=generator))
        persrm.head.bias.add_(scale * torch.randn(d, generator=generator))
    return persrm


def last_logits(lm, ids) -> torch.Tensor:
    """The model's next-token logits after ``ids``, by a full forward on its own device."""
    return lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1]


def greedy_without_cache(lm, persrm, ids, steps, weight=1.0, k=10, use_pad=True):
    """Reference: recompute the whole sequence every step, the released PAD code's way."""
    ids = list(ids)
    out = []
    lm_head = lm.model.get_output_embeddings().weight
    eos = lm.tokenizer.eos_token_id
    with torch.inference_mode():
        for _ in range(steps):
            hidden = lm.model.get_decoder()(
                input_ids=torch.tensor([ids], device=lm.device)).last_hidden_state[0, -1]
            base = (hidden @ lm_head.T).float()
            if use_pad:
                top = base.topk(k).indices
                reward = persrm.reward_logits(hidden[None], lm_head)[0].float()
                gain = reward[top].log_softmax(-1) - base[top].log_softmax(-1)
                score = base[top] + weight * gain
                token = int(top[score.argmax()])
            else:
                token = int(base.argmax())
            if token == eos:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["base", "pad"])
def test_cached_decode_equals_full_recompute(default_lm, strategy):
    persrm = perturbed_persrm(default_lm)
    engine = Personalizer(default_lm, persrm=persrm)
    prompt = "Give me three tips for staying focused while studying."
    config = GenerationConfig(max_new_tokens=32, weight=1.0)
    cached = engine.generate([prompt], PREFERENCE, strategy, config)[0].tokens
    preference = engine.request(prompt, PREFERENCE).preference.text if strategy == "pad" else ""
    ids = render(default_lm.tokenizer, prompt, preference, engine.placement)
    reference = greedy_without_cache(default_lm, persrm, ids, 32, use_pad=strategy == "pad")
    assert cached == reference
    assert len(cached) == 32


@pytest.mark.slow
def test_pad_with_identity_head_equals_prompting(default_engine):
    prompts = ["How do vaccines work?", "Write a short poem about autumn."]
    config = GenerationConfig(max_new_tokens=24)
    pad = default_engine.generate(prompts, PREFERENCE, "pad", config)
    prompt = default_engine.generate(prompts, PREFERENCE, "prompt", config)
    assert [g.tokens for g in pad] == [g.tokens for g in prompt]


@pytest.mark.slow
def test_batch_equals_each_prompt_alone_with_early_eos(default_lm):
    """A head perturbed enough to change PAD's tokens, little enough to keep EOS reachable.
    For weights that never say EOS (the GPU check's random ones), one of the first prompt's
    early tokens that some other row never produces is made an end token too, so one row of
    the batch stops early and another runs to the length limit, through the same device-side
    check (on degenerate weights whose rows all repeat the same tokens, every row stops
    early: then only the equality and the early stop are checked)."""
    engine = Personalizer(default_lm, persrm=perturbed_persrm(default_lm, scale=0.02))
    prompts = ["What is 2+2? Answer with one number.",
               "Write a long story about a dragon who learns to bake bread.",
               "Name one color.",
               "Explain photosynthesis to a curious adult in detail."]
    config = GenerationConfig(max_new_tokens=32)
    for strategy in ["base", "pad"]:
        engine.eos_ids = eos_ids(default_lm.tokenizer, default_lm.model.generation_config)
        first, *others = [engine.generate([p], PREFERENCE, strategy, config)[0]
                          for p in prompts]
        mixed = first.finish_reason == "stop"
        if not mixed:  # random weights: make one of the first row's tokens an end token
            running = [set(g.tokens) for g in others if g.finish_reason == "length"]
            separating = next((t for t in first.tokens[3:]
                               if any(t not in seen for seen in running)), None)
            mixed = separating is not None  # else every row says the first row's tokens
            engine.eos_ids = sorted({*engine.eos_ids, first.tokens[3] if separating is None
                                     else separating})
        together = engine.generate(prompts, PREFERENCE, strategy, config, batch_size=4)
        alone = [engine.generate([p], PREFERENCE, strategy, config)[0] for p in prompts]
        assert [g.tokens for g in together] == [g.tokens for g in alone]
        assert together[0].finish_reason == "stop" and together[0].new_tokens < 32
        if mixed:
            assert "length" in [g.finish_reason for g in together]


@pytest.mark.slow
def test_same_seed_same_sample_different_seed_differs(default_engine):
    def sample(seed):
        config = GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return default_engine.generate(["Tell me about the sea."], PREFERENCE, "pad",
                                       config)[0].tokens

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_linear_alignment_with_zero_alpha_equals_prompting(tiny_engine):
    config = GenerationConfig(max_new_tokens=12, weight=0.0)
    prompts = ["Hello there", "What is the capital of France?"]
    la = tiny_engine.generate(prompts, PREFERENCE, "linear-alignment", config)
    prompt = tiny_engine.generate(prompts, PREFERENCE, "prompt", config)
    assert [g.tokens for g in la] == [g.tokens for g in prompt]


def test_linear_alignment_matches_two_separate_contexts(tiny_engine, tiny_lm):
    """The batched two-lane forward equals running the two contexts separately."""
    prompt, alpha = "Describe a cat.", 2.0
    config = GenerationConfig(max_new_tokens=10, weight=alpha)
    tokens = tiny_engine.generate([prompt], PREFERENCE, "linear-alignment", config)[0].tokens
    preference = tiny_engine.request(prompt, PREFERENCE).preference.text
    with_pref = render(tiny_lm.tokenizer, prompt, preference, tiny_engine.placement)
    without = render(tiny_lm.tokenizer, prompt, "", tiny_engine.placement)
    reference = []
    with torch.inference_mode():
        for _ in range(10):
            zp = last_logits(tiny_lm, with_pref + reference)
            z0 = last_logits(tiny_lm, without + reference)
            top = zp.topk(10).indices
            reference.append(int(top[(zp[top] + alpha * (zp[top] - z0[top])).argmax()]))
    assert tokens == reference


def test_rows_joining_mid_decode_match_decoding_alone(tiny_engine):
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    first, second = "Hello there", "A much longer prompt that should need more padding here."
    batch = tiny_engine.batch("pad")
    batch.join([tiny_engine.request(first, PREFERENCE, config)])
    for _ in range(3):
        batch.step()
    batch.join([tiny_engine.request(second, PREFERENCE, config)])
    while batch.rows:
        batch.step()
    joined = {row.request.prompt: row.tokens for row in batch.finished}
    for prompt in (first, second):
        alone = tiny_engine.generate([prompt], PREFERENCE, "pad", config)[0].tokens
        assert joined[prompt] == alone


def test_leaving_rows_does_not_disturb_the_rest(tiny_engine):
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    prompts = ["one", "two is longer than one", "three"]
    batch = tiny_engine.batch("linear-alignment")
    rows = batch.join([tiny_engine.request(p, PREFERENCE, config) for p in prompts])
    batch.step()
    batch.leave([rows[1]])
    while batch.rows:
        batch.step()
    for row in (rows[0], rows[2]):
        alone = tiny_engine.generate([row.request.prompt], PREFERENCE, "linear-alignment",
                                     config)[0].tokens
        assert row.tokens == alone


def test_stop_strings_cut_text_and_stream_never_leaks_them(tiny_engine):
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    full = tiny_engine.generate(["Hi"], None, "base", config)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    events = list(tiny_engine.stream("Hi", None, "base",
                                     GenerationConfig(max_new_tokens=30, ignore_eos=True,
                                                      stop=(stop,))))
    streamed = "".join(e.delta for e in events)
    assert stop not in streamed
    assert full.startswith(streamed) and events[-1].row.finish_reason == "stop"
    assert streamed == events[-1].row.text


def test_no_repeat_ngram_size_holds_in_output(tiny_engine):
    config = GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=2, ignore_eos=True)
    for strategy in ["base", "pad", "linear-alignment", "args"]:
        tokens = tiny_engine.generate(["Repeat after me"], PREFERENCE, strategy, config)[0].tokens
        bigrams = list(zip(tokens, tokens[1:], strict=False))
        assert len(bigrams) == len(set(bigrams)), strategy


class PreferTokenScorer(SequenceScorer):
    """Toy sequence scorer: +1 for every occurrence of one token."""

    def __init__(self, token):
        self.token = token

    def __call__(self, items):
        return torch.tensor([float(list(item.response).count(self.token)) for item in items])


def test_args_picks_what_the_scorer_prefers(tiny_lm):
    engine = Personalizer(tiny_lm, persrm="identity")
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    plain = engine.generate(["Hello"], None, "base", config)[0].tokens
    request = engine.request("Hello", None, config)
    ids = render(tiny_lm.tokenizer, "Hello", "", engine.placement)
    with torch.inference_mode():
        logits = tiny_lm.model(torch.tensor([ids])).logits[0, -1]
    favourite = int(logits.topk(10).indices[7])  # a candidate greedy would not pick
    assert favourite != plain[0]
    engine._strategies["args"] = ArgsStrategy(tiny_lm, PreferTokenScorer(favourite),
                                             engine.placement, default_weight=100.0)
    args = engine._decode("args", [request])[0].tokens
    assert args[0] == favourite


KOALA = ["What are the layers of the TCP/IP model?",
         "Why do people keep cash on hand instead of investing it?"]


def dimension_reward(engine, prompts, preference, generations) -> float:
    """The mean dimension reward of finished responses (what ARGS's default scorer says)."""
    return float(engine.scorer([Scored(engine.request(p, preference), [[]], g.tokens)
                                for p, g in zip(prompts, generations, strict=True)]).mean())


def test_args_default_scorer_is_not_the_persrm_so_args_is_not_pad(default_lm):
    """Issue 29. With the PersRM's implicit reward as its scorer, greedy ARGS on a
    shared-backbone PersRM scores ``z(a) + w (log pi_R(a) - log pi_ref(a))``, PAD's score up
    to a per-row constant: the same tokens (the control below, on the shipped PersRM). Its
    default scorer is the per-dimension reward models, so ``args`` is a baseline of its own:
    other tokens than PAD, and responses the dimension rewards rate above preference
    prompting's (the reward is really steering, at the default weight)."""
    config = GenerationConfig(max_new_tokens=12)
    engine = Personalizer(default_lm)  # the shipped PersRM; the default scorer
    assert isinstance(engine.scorer, DimensionScorer)
    assert engine.persrm.shares_backbone and engine.persrm.path  # the shipped, trained one
    own_reward = Personalizer(default_lm, persrm=engine.persrm, scorer="persrm")
    gains = []
    for preference in ("P1A", "P3B"):
        pad = [g.tokens for g in engine.generate(KOALA, preference, "pad", config)]
        same = own_reward.generate(KOALA, preference, "args", config)
        assert [g.tokens for g in same] == pad  # the tautology the default scorer removes
        args = engine.generate(KOALA, preference, "args", config)
        assert all(g.tokens != tokens for g, tokens in zip(args, pad, strict=True))
        prompted = engine.generate(KOALA, preference, "prompt", config)
        gains.append(dimension_reward(engine, KOALA, preference, args)
                     - dimension_reward(engine, KOALA, preference, prompted))
    assert min(gains) > 0, gains


def test_dimension_scorer_is_the_mean_of_the_requested_dimension_rewards(tiny_lm):
    """Hand-built: each score equals ``DimensionRewards.scores`` computed the plain way (one
    prompt and one response at a time) averaged over the request's preset ids; a dialogue's
    instruction is its last user turn; one call embeds everything once."""
    from padlm.core.preferences import parse_preference
    from padlm.judges.embedding import default_encoder
    from padlm.judges.harmlessness import features
    from padlm.orchestration.rewards import DimensionRewards, shipped_rewards_dir

    tokenizer = tiny_lm.tokenizer
    dialogue = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Explain the tides."}]
    cases = [("Why is the sky blue?", "P1A+P2B", "Because air scatters blue light most."),
             ("Why is the sky blue?", "P1A", "Because air scatters blue light most."),
             (dialogue, "P3B", "Ugh. The moon pulls the water. Figure out the rest."),
             (dialogue, "P1B+P2A+P3A", "Lunisolar gravitational gradients, friend!")]
    items = [Scored(Request(prompt, parse_preference(preference)), [[]],
                    tokenizer(response, add_special_tokens=False)["input_ids"])
             for prompt, preference, response in cases]
    got = DimensionScorer(tokenizer)(items)
    rewards = DimensionRewards.load(shipped_rewards_dir())
    encoder = default_encoder()
    expected = []
    for prompt, preference, response in cases:
        instruction = prompt if isinstance(prompt, str) else "Explain the tides."
        both = features(encoder.encode([instruction]), encoder.encode([response]))[0]
        ids = preference.split("+")
        expected.append(sum(float(both @ rewards.weights[i].float()) for i in ids) / len(ids))
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-3  # the second dimension counts


@pytest.mark.parametrize("strategy", ["args", "best-of-n"])
def test_the_dimension_scorer_refuses_what_it_cannot_score_before_decoding(
        tiny_lm, strategy, monkeypatch):
    """Free text (or no preference, or a preset without a reward model) is refused with the
    preference and the alternative named, before any forward pass; ``scorer="persrm"``
    takes free text."""
    engine = Personalizer(tiny_lm, persrm="identity")
    config = GenerationConfig(max_new_tokens=3)

    def no_forward(*args, **kwargs):
        raise AssertionError("decoding started")

    cases = [("be nice to me", "free-text preference 'be nice to me'.*--scorer persrm"),
             (None, "need a preference of preset ids"),
             ("harmless", "no dimension reward for harmless.*--scorer persrm")]
    with monkeypatch.context() as patch:
        patch.setattr(tiny_lm.model, "forward", no_forward)
        for preference, message in cases:
            with pytest.raises(PadlmError, match=message) as caught:
                engine.generate(["Hi"], preference, strategy, config, n=2)
            assert caught.value.param == "preference"
    persrm = Personalizer(tiny_lm, persrm="identity", scorer="persrm")
    assert persrm.generate(["Hi"], "be nice to me", strategy, config, n=2)[0].tokens


def unconditioned(persrm: PersonalizedRewardModel) -> PersonalizedRewardModel:
    persrm.config.reference = "unconditioned"
    return persrm


def test_pad_with_identity_unconditioned_head_equals_linear_alignment(tiny_lm):
    """With the preference-free base as reference, W = I gives
    ``z_p + w (log softmax_K z_p - log softmax_K z_0)``: Linear Alignment up to a constant."""
    identity = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    engine = Personalizer(tiny_lm, persrm=unconditioned(identity))
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, weight=2.0)
    prompts = ["Describe a cat.", "What is the capital of France?"]
    pad = engine.generate(prompts, PREFERENCE, "pad", config)
    la = engine.generate(prompts, PREFERENCE, "linear-alignment", config)
    assert [g.tokens for g in pad] == [g.tokens for g in la]
    assert engine.strategy("pad").new_streams()[0].lanes == 2


def test_pad_unconditioned_matches_a_two_context_reference(tiny_lm):
    persrm = unconditioned(perturbed_persrm(tiny_lm, scale=0.5))
    engine = Personalizer(tiny_lm, persrm=persrm)
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True, weight=2.0)
    tokens = engine.generate(["Hello"], PREFERENCE, "pad", config)[0].tokens
    preference = engine.request("Hello", PREFERENCE).preference.text
    with_pref = render(tiny_lm.tokenizer, "Hello", preference, engine.placement)
    without = render(tiny_lm.tokenizer, "Hello", "", engine.placement)
    lm_head = tiny_lm.model.get_output_embeddings().weight
    reference = []
    with torch.inference_mode():
        for _ in range(10):
            base = last_logits(tiny_lm, with_pref + reference)
            hidden = tiny_lm.model.get_decoder()(
                input_ids=torch.tensor([with_pref + reference], device=tiny_lm.device)
            ).last_hidden_state[0, -1]
            neutral = last_logits(tiny_lm, without + reference)
            top = base.topk(10).indices
            reward = persrm.reward_logits(hidden[None], lm_head, top[None])[0]
            score = base[top] + 2.0 * (reward.log_softmax(-1) - neutral[top].log_softmax(-1))
            reference.append(int(top[score.argmax()]))
    assert tokens == reference


@pytest.mark.parametrize("reference", ["conditioned", "unconditioned"])
def test_args_incremental_scorer_equals_full_recompute(tiny_lm, reference):
    """ARGS with the PersRM's implicit reward (``scorer="persrm"``): the one-head-product
    incremental path picks what full forwards over all k continuations pick."""
    persrm = perturbed_persrm(tiny_lm, scale=0.5)
    persrm.config.reference = reference
    engine = Personalizer(tiny_lm, persrm=persrm, scorer="persrm")
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, weight=3.0)
    fast = engine.generate(["Hello", "Tell me a joke"], PREFERENCE, "args", config)
    assert engine.strategy("args").incremental

    slow_strategy = ArgsStrategy(tiny_lm, ImplicitRewardScorer(tiny_lm, persrm),
                                 engine.placement, 1.0)
    slow_strategy.incremental = False  # score all k continuations by full forwards
    engine._strategies["args"] = slow_strategy
    slow = engine.generate(["Hello", "Tell me a joke"], PREFERENCE, "args", config)
    assert [g.tokens for g in fast] == [g.tokens for g in slow]


def test_unconditioned_scorer_needs_and_uses_the_preference_free_context(tiny_lm):
    from padlm.errors import PadlmError

    persrm = unconditioned(PersonalizedRewardModel.identity(
        tiny_lm.name, tiny_lm.model.config.hidden_size))
    scorer = ImplicitRewardScorer(tiny_lm, persrm)
    assert scorer.lanes == ("neutral",)
    context = render(tiny_lm.tokenizer, "Hello", "Be brief.", "user-prefix")
    neutral = render(tiny_lm.tokenizer, "Hello", "", "user-prefix")
    response = [5, 6, 7]
    with pytest.raises(PadlmError, match="neutral_contexts"):
        scorer.score_ids([context], [response])
    [score] = scorer([Scored(Request("Hello", Preference("Be brief.")), [context, neutral],
                             response)])
    with torch.inference_mode():
        def logp(ctx):
            logits = tiny_lm.model(torch.tensor([ctx + response])).logits[0].float()
            return logits[len(ctx) - 1:-1].log_softmax(-1).gather(
                1, torch.tensor(response)[:, None]).sum()
        expected = logp(context) - logp(neutral)  # the preference's PMI with the response
    assert float(score) == pytest.approx(float(expected), abs=1e-4)
    engine = Personalizer(tiny_lm, persrm=persrm, scorer="persrm")  # free text: the PersRM
    best = engine.best_of_n("Hello", "Be brief.", GenerationConfig(max_new_tokens=6, seed=1),
                            n=2)
    assert best.score is not None


def test_best_of_n_picks_the_scorers_favourite(tiny_lm):
    shortest_first = Personalizer(tiny_lm, persrm="identity",
                                  scorer=lambda items: torch.tensor(
                                      [-float(len(item.response)) for item in items]))
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=5)
    best = shortest_first.best_of_n("Hello", None, config, n=4)
    candidates = [shortest_first.generate(["Hello"], None, "prompt",
                                          GenerationConfig(max_new_tokens=20, temperature=1.0,
                                                           seed=5 + i))[0] for i in range(4)]
    assert best.new_tokens == min(c.new_tokens for c in candidates)
    assert best.tokens in [c.tokens for c in candidates]


def test_best_of_n_over_many_prompts_is_one_batch_with_the_same_answers(tiny_lm):
    engine = Personalizer(tiny_lm, persrm="identity",
                          scorer=lambda items: torch.tensor(
                              [float(sum(item.response) % 7) for item in items]))
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=9)
    prompts = ["Hello", "Tell me a joke", "Why is the sky blue?"]
    batched = engine.generate(prompts, "P2A", "best-of-n", config, batch_size=3, n=3)
    alone = [engine.best_of_n(p, "P2A", config, n=3) for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.score for g in batched] == [g.score for g in alone]


def lora_persrm(lm, init_lora_weights=True) -> PersonalizedRewardModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=init_lora_weights)
    torch.manual_seed(3)
    backbone = get_peft_model(copy.deepcopy(lm.model), config, adapter_name=ADAPTER_NAME)
    persrm = PersonalizedRewardModel.identity(lm.name, lm.model.config.hidden_size)
    persrm.config.lora = True
    persrm.backbone = backbone.eval()
    return persrm


def test_lora_path_with_zero_adapter_equals_prompting(tiny_lm):
    engine = Personalizer(tiny_lm, persrm=lora_persrm(tiny_lm))
    config = GenerationConfig(max_new_tokens=10)
    pad = engine.generate(["Hello", "Name a fruit"], PREFERENCE, "pad", config)
    prompt = engine.generate(["Hello", "Name a fruit"], PREFERENCE, "prompt", config)
    assert [g.tokens for g in pad] == [g.tokens for g in prompt]


def test_lora_path_matches_two_model_reference(tiny_lm):
    persrm = lora_persrm(tiny_lm, init_lora_weights=False)  # random, non-zero adapter
    engine = Personalizer(tiny_lm, persrm=persrm)
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True, weight=2.0)
    tokens = engine.generate(["Hello"], PREFERENCE, "pad", config)[0].tokens
    ids = render(tiny_lm.tokenizer, "Hello", engine.request("Hello", PREFERENCE).preference.text,
                 engine.placement)
    lm_head = tiny_lm.model.get_output_embeddings().weight
    merged = copy.deepcopy(persrm.backbone).merge_and_unload()
    reference = []
    with torch.inference_mode():
        for _ in range(10):
            seq = torch.tensor([ids + reference])
            base = tiny_lm.model(seq).logits[0, -1]
            hidden = merged.get_decoder()(input_ids=seq).last_hidden_state[0, -1]
            reward = hidden @ lm_head.T
            top = base.topk(10).indices
            score = base[top] + 2.0 * (reward[top].log_softmax(-1) - base[top].log_softmax(-1))
            reference.append(int(top[score.argmax()]))
    assert tokens == reference


def test_echo_guard_with_an_identity_unconditioned_head_equals_guarded_linear_alignment(tiny_lm):
    identity = PersonalizedRewardModel.identity(tiny_lm.name, tiny_lm.model.config.hidden_size)
    engine = Personalizer(tiny_lm, persrm=unconditioned(identity))
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, weight=2.0, echo_guard=True)
    prompts = ["Describe a cat.", "What is the capital of France?"]
    pad = engine.generate(prompts, PREFERENCE, "pad", config)
    la = engine.generate(prompts, PREFERENCE, "linear-alignment", config)
    assert [g.tokens for g in pad] == [g.tokens for g in la]


@pytest.mark.parametrize("strategy", ["prompt", "base", "args", "best-of-n"])
def test_echo_guard_is_refused_where_there_is_no_bonus_to_cap(tiny_engine, strategy):
    with pytest.raises(PadlmError, match=re.escape(echo_guard_refusal(strategy))):
        tiny_engine.generate(["Hi"], PREFERENCE, strategy,
                             GenerationConfig(max_new_tokens=2, echo_guard=True), n=2)


@pytest.mark.parametrize("strategy", strategy_names(echo_guard=True))
def test_every_echo_guarded_name_is_a_strategy_that_takes_the_guard(tiny_engine, strategy):
    tiny_engine.generate(["Hi"], PREFERENCE, strategy,
                         GenerationConfig(max_new_tokens=2, echo_guard=True))


@pytest.mark.slow
def test_echo_guard_stops_linear_alignment_quoting_the_preference(default_engine, default_lm):
    """On the real model, Linear Alignment copies P1B's words ("a PhD Student in that specific
    field could understand") into the answer; with the guard it does not, and every guarded
    step equals a brute-force two-context decode with the capped shift."""
    prompt, steps = "Give me three tips for learning to cook.", 24
    preference = default_engine.request(prompt, "P1B").preference.text
    config = GenerationConfig(max_new_tokens=steps, no_repeat_ngram_size=3)
    plain = default_engine.generate([prompt], "P1B", "linear-alignment", config)[0]
    guarded = default_engine.generate([prompt], "P1B", "linear-alignment",
                                      replace(config, echo_guard=True))[0]
    assert "PhD Student in that specific field" in plain.text
    assert "in that specific field" not in guarded.text
    tokenizer = default_lm.tokenizer
    guarded_ids = torch.tensor(preference_token_ids(tokenizer, preference))
    with_pref = render(tokenizer, prompt, preference, default_engine.placement)
    without = render(tokenizer, prompt, "", default_engine.placement)
    reference, capped = [], 0
    with torch.inference_mode():
        while len(reference) < steps:
            zp = last_logits(default_lm, with_pref + reference)
            z0 = last_logits(default_lm, without + reference)
            for token in guidance.banned_ngram_tokens(reference, 3):
                zp[token] = float("-inf")
            top = zp.topk(10).indices
            shift = zp[top] - z0[top]
            echo = torch.isin(top, guarded_ids)
            capped += int((echo & (shift > 0)).sum())
            token = int(top[(zp[top] + torch.where(echo, shift.clamp(max=0), shift)).argmax()])
            if token in default_engine.eos_ids:
                break
            reference.append(token)
    assert guarded.tokens == reference
    assert capped > 0  # the guard really acted on this decode


def test_a_stream_without_logits_gives_the_same_hidden_states(tiny_lm):
    """``KVStream(logits=False)`` runs only the transformer body: its last hidden states
    equal those of the stream that also makes logits, at the prefill and at every step."""
    from padlm.core.kvstream import KVStream

    contexts = [render(tiny_lm.tokenizer, p, "", "user-prefix")
                for p in ("Hi there.", "Tell me a long story about a cat.")]
    full, bare = KVStream(tiny_lm.model, lanes=2), KVStream(tiny_lm.model, lanes=2, logits=False)
    outs = [full.join(contexts), bare.join(contexts)]
    assert outs[1].logits is None
    for token in (5, 17, 3):
        assert torch.allclose(outs[0].hidden, outs[1].hidden, atol=1e-5)
        outs = [full.step(torch.tensor([token])), bare.step(torch.tensor([token]))]
    with pytest.raises(ValueError, match="adapter"):
        KVStream(tiny_lm.model, lanes=1, adapters=["a"], logits=False)
