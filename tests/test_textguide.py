"""A guide with its own tokenizer: base tokens read as bytes, candidates scored as the
guide's log-probability of their text (brute force over whole sequences as the reference),
the guide's cache in lock-step with the base (a fresh encoding as the reference)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from padlm import GenerationConfig, Personalizer
from padlm.core.models import LoadedModel
from padlm.core.preferences import parse_preference
from padlm.core.prompting import render
from padlm.core.textguide import TextGuideStream
from padlm.core.transduction import END, Transducer
from padlm.errors import PadlmError

TEXT = ("Hello there! Café au lait costs 3€ — naïve 東京 🙂 friends. "
        "The quick brown fox jumps over the lazy dog; résumé, jalapeño, 😀 emoji.")
CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def other_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of its own (400 tokens, trained here): a guide whose ids
    mean nothing to the base."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|start|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT * 3, "The fox and the dog are friends."] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>",
                                        pad_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def other_guide(other_tokenizer) -> LoadedModel:
    config = LlamaConfig(vocab_size=len(other_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(1)
    return LoadedModel(LlamaForCausalLM(config).eval(), other_tokenizer, "tiny-other-guide")


def plain(guide: LoadedModel):
    head = guide.model.get_output_embeddings().weight
    return lambda hidden: hidden.float() @ head.float().T


def sequence_log_prob(guide: LoadedModel, context: list[int], continuation: list[int]
                      ) -> float:
    """Brute force: one forward over the whole sequence, no cache."""
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        log_probs = guide.model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[len(context) - 1 + j, token])
               for j, token in enumerate(continuation))


def test_with_the_same_tokenizer_every_token_is_its_own_segment(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    transducer = Transducer(tokenizer, tokenizer, [tokenizer.eos_token_id], "base", "guide")
    regular = [i for i in range(len(tokenizer)) if i not in tokenizer.added_tokens_decoder]
    assert [i for i in regular if transducer.segment(i) != (i,)] == []
    assert transducer.segment(tokenizer.eos_token_id) == END


def test_another_tokenizer_reads_the_same_bytes(tiny_lm, other_tokenizer):
    base = tiny_lm.tokenizer
    transducer = Transducer(base, other_tokenizer, [base.eos_token_id], "base", "guide")
    ids = base.encode(TEXT, add_special_tokens=False)
    # the base splits some characters across tokens (its bytes come out in pieces)
    assert any("\ufffd" in base.decode([i]) for i in ids)
    guide_ids = [g for i in ids for g in transducer.segment(i)]
    assert other_tokenizer.decode(guide_ids) == TEXT
    assert max(len(transducer.segment(i)) for i in ids) > 1  # some need several guide tokens


def test_a_candidate_scores_the_product_of_its_guide_tokens(tiny_lm, other_guide):
    """Rows of different lengths; candidates of one to several guide tokens, an end of
    turn; each equals a whole-sequence forward, also after a ragged step."""
    base = tiny_lm.tokenizer
    transducer = Transducer(base, other_guide.tokenizer, [base.eos_token_id], "base", "guide")
    end = other_guide.tokenizer.convert_tokens_to_ids("<|end|>")
    stream = TextGuideStream(other_guide.model, transducer, [end])
    contexts = [other_guide.tokenizer.encode("The fox and"),
                other_guide.tokenizer.encode("Hello there! The quick brown fox jumps")]
    out = stream.join(contexts)
    words = ["ĠjalapeÃ±o", "Ġdog", "Ġfriends", "Ġnaive"]
    candidates = [base.convert_tokens_to_ids(w) for w in words if w in base.get_vocab()]
    candidates += [base.encode(" 東京", add_special_tokens=False)[0], base.eos_token_id]
    segments = [transducer.segments(candidates)] * 2
    assert max(len(s) for s in segments[0]) >= 2
    for step in range(2):
        got = out.candidate_log_probs(segments, [(0, plain(other_guide))])[:, 0]
        for row, context in enumerate(contexts):
            for i, segment in enumerate(segments[row]):
                continuation = [end] if segment == END else list(segment)
                expected = sequence_log_prob(other_guide, context, continuation)
                assert got[row, i].item() == pytest.approx(expected, abs=1e-4), (step, row, i)
        first_only = out.candidate_log_probs(segments, [(0, plain(other_guide))], True)
        for i, segment in enumerate(segments[0]):
            first = [end] if segment == END else [segment[0]]
            assert first_only[0, 0, i].item() == pytest.approx(
                sequence_log_prob(other_guide, contexts[0], first), abs=1e-4)
        # a ragged step: row 0 reads a several-token segment, row 1 one token
        chosen = [candidates[[len(s) for s in segments[0]].index(
            max(len(s) for s in segments[0]))], candidates[-2]]
        out = stream.step(torch.tensor(chosen))
        contexts = [c + list(transducer.segment(t)) for c, t in zip(contexts, chosen,
                                                                     strict=True)]


def test_the_guides_cache_after_steps_equals_a_fresh_encoding(tiny_lm, other_guide):
    base = tiny_lm.tokenizer
    transducer = Transducer(base, other_guide.tokenizer, [base.eos_token_id], "base", "guide")
    stream = TextGuideStream(other_guide.model, transducer, [0], lanes=2)
    contexts = [other_guide.tokenizer.encode("Hi"), other_guide.tokenizer.encode("Hi there")]
    stream.join([contexts[0], contexts[0], contexts[1], contexts[1]])
    ids = base.encode(TEXT, add_special_tokens=False)
    streams = [ids[:12], ids[12:24]]
    for step in range(12):
        out = stream.step(torch.tensor([streams[0][step], streams[1][step]]))
    for row in range(2):
        fresh = contexts[row] + [g for t in streams[row] for g in transducer.segment(t)]
        with torch.inference_mode():
            hidden = other_guide.model.get_decoder()(
                input_ids=torch.tensor([fresh])).last_hidden_state[0, -1]
        for lane in range(2):
            torch.testing.assert_close(out.hidden[row, lane], hidden, atol=1e-4, rtol=1e-4)
    assert stream.mask.shape[1] >= len(contexts[1]) + 12


PREFERENCE = "P1A"
PROMPTS = ["Why is the sky blue?", "Name three fruits that are red, and say why 🍎 is one."]


@pytest.fixture(scope="module")
def other_guide_dir(other_guide, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("other-guide")
    other_guide.model.save_pretrained(directory)
    other_guide.tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("reference", ["guide-unconditioned", "none", "base"])
def test_reading_text_with_the_same_tokenizer_equals_reading_ids(tiny_lm, guide_dir,
                                                                 reference):
    """The strongest check of the text alignment: a guide with the base's own tokenizer,
    made to read text, picks exactly the tokens it picks reading ids."""
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True, weight=50.0)
    runs = {}
    for alignment in ("ids", "text"):
        engine = Personalizer(tiny_lm, persrm=str(guide_dir), reference=reference,
                              guide_alignment=alignment)
        assert (engine.persrm.transducer is not None) == (alignment == "text")
        runs[alignment] = [g.tokens for g in engine.generate(PROMPTS, PREFERENCE, "pad",
                                                              config)]
    assert runs["text"] == runs["ids"]


def brute_force_text_pad(base: LoadedModel, guide: LoadedModel, transducer: Transducer,
                         prompt: str, steps: int, weight: float, first_token_only: bool
                         ) -> list[int]:
    """Greedy PAD with a guide of another tokenizer and no reference, recomputing both models
    over whole sequences at every step: each candidate's reward is the guide's
    log-probability of its text's guide tokens (or of the first only), softmaxed over K."""
    text = parse_preference(PREFERENCE).text
    context = render(base.tokenizer, prompt, text, "user-prefix")
    guide_context = render(guide.tokenizer, prompt, text, "user-prefix")
    end = guide.tokenizer.eos_token_id
    tokens: list[int] = []
    for _ in range(steps):
        with torch.inference_mode():
            z_b = base.model(torch.tensor([context + tokens])).logits[0, -1].float()
        candidates = z_b.topk(10).indices.tolist()
        read = guide_context + [g for t in tokens for g in transducer.segment(t)]
        guide_scores = []
        for candidate in candidates:
            segment = transducer.segment(candidate)
            segment = [end] if segment == END else list(segment)
            guide_scores.append(sequence_log_prob(
                guide, read, segment[:1] if first_token_only else segment))
        reward = torch.tensor(guide_scores).log_softmax(-1)
        tokens.append(candidates[int((z_b[candidates] + weight * reward).argmax())])
    return tokens


@pytest.mark.parametrize("alignment", ["auto", "first-token"])
def test_a_guide_with_its_own_tokenizer_equals_recomputing_both_models(
        tiny_lm, other_guide_dir, alignment, caplog):
    with caplog.at_level(logging.INFO, logger="padlm.core.guides"):
        engine = Personalizer(tiny_lm, persrm=str(other_guide_dir), reference="none",
                              guide_alignment=alignment)
        transducer = engine.persrm.transducer
    assert transducer is not None
    assert alignment != "auto" or "its own tokenizer" in caplog.text
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, weight=50.0)
    together = engine.generate(PROMPTS, PREFERENCE, "pad", config)  # rows of two lengths
    for prompt, generation in zip(PROMPTS, together, strict=True):
        assert generation.tokens == brute_force_text_pad(
            tiny_lm, engine.persrm.guide, transducer, prompt, 8, 50.0,
            alignment == "first-token")


def test_first_token_scoring_cannot_tell_apart_what_exact_scoring_can(tiny_lm, other_guide):
    """Two candidates whose text starts with the same guide token (``Hello`` / ``Help``):
    PAD's released mapping scores them alike, exact scoring by their whole text does not."""
    base = tiny_lm.tokenizer
    transducer = Transducer(base, other_guide.tokenizer, [base.eos_token_id], "base", "guide")
    by_first: dict[int, list[int]] = {}
    for token in range(5000):
        segment = transducer.segment(token)
        if len(segment) > 1:
            by_first.setdefault(segment[0], []).append(token)
    pair = next(tokens[:2] for tokens in by_first.values()
                if len(tokens) > 1 and transducer.segment(tokens[0]) != transducer.segment(
                    tokens[1]))
    stream = TextGuideStream(other_guide.model, transducer, [0])
    out = stream.join([other_guide.tokenizer.encode("The fox and")])
    segments = [transducer.segments(pair)]
    first = out.candidate_log_probs(segments, [(0, plain(other_guide))], True)[0, 0]
    exact = out.candidate_log_probs(segments, [(0, plain(other_guide))])[0, 0]
    assert first[0] == first[1] and exact[0] != exact[1]


def test_a_stop_string_split_across_tokens_ends_the_row(tiny_lm, other_guide_dir):
    engine = Personalizer(tiny_lm, persrm=str(other_guide_dir))
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, weight=5.0)
    [free] = engine.generate(PROMPTS[:1], PREFERENCE, "pad", config)
    pieces = [tiny_lm.tokenizer.decode(free.tokens[:n]) for n in range(1, 13)]
    cut = next(n for n in range(4, 12) if len(pieces[n]) > len(pieces[n - 1]) + 1)
    stop = pieces[cut][len(pieces[cut - 1]) - 1:len(pieces[cut - 1]) + 1]  # spans a boundary
    [stopped] = engine.generate(PROMPTS[:1], PREFERENCE, "pad",
                                GenerationConfig(max_new_tokens=12, ignore_eos=True,
                                                 weight=5.0, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert free.text.startswith(stopped.text) and free.text[len(stopped.text):].startswith(stop)


def test_guide_alignment_is_refused_where_it_cannot_apply(tiny_lm, other_guide_dir):
    with pytest.raises(PadlmError, match="guide alignment must be one of"):
        Personalizer(tiny_lm, persrm="identity", guide_alignment="bytes")
    with pytest.raises(PadlmError, match="cannot read the base's token ids"):
        Personalizer(tiny_lm, persrm=str(other_guide_dir), guide_alignment="ids").check(
            "pad", GenerationConfig())
    with pytest.raises(PadlmError, match="applies to a guide model of its own"):
        Personalizer(tiny_lm, persrm="identity", guide_alignment="text").check(
            "pad", GenerationConfig())


@pytest.mark.slow
def test_on_the_default_model_reading_text_equals_reading_ids(default_lm):
    """The real default model guided by itself as a separate guide: through its text, PAD
    decodes the very tokens it decodes through its ids (real tokenizer, chat template and
    weights; greedy, so any difference in a reward would show in the tokens)."""
    config = GenerationConfig(max_new_tokens=24, weight=2.0)
    prompts = ["Explain photosynthesis.", "Give me a tip for a job interview, café-style ☕."]
    decoded = {}
    for alignment in ("ids", "text"):
        engine = Personalizer(default_lm, persrm=default_lm.name,
                              reference="guide-unconditioned", guide_alignment=alignment)
        decoded[alignment] = [g.tokens for g in engine.generate(prompts, "P3A", "pad", config)]
    assert decoded["text"] == decoded["ids"]
