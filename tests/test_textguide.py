"""A guide with its own tokenizer: base tokens read as bytes, candidates scored as the
guide's log-probability of their text (brute force over whole sequences as the reference),
the guide's cache in lock-step with the base (a fresh encoding as the reference)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from padlm.core.models import LoadedModel
from padlm.core.textguide import TextGuideStream
from padlm.core.transduction import END, Transducer

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
