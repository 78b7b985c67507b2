"""Guide checkpoints saved exactly as other people's code saves them, on tiny models: PAD's
released layout (sharded or .bin weights plus a value-head file), plain causal LMs, PEFT
adapters, and what is refused (scalar heads, classification reward models, empty dirs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from padlm.core.checkpoints import (
    GUIDE_LAYOUTS,
    inspect_guide,
    load_guide_model,
    read_value_head,
    shared_vocabulary,
)
from padlm.core.models import ensure_default_model, load_model
from padlm.core.persrm import ADAPTER_NAME, PersonalizedRewardModel, PersRMConfig, ValueHead
from padlm.errors import PadlmError

HIDDEN = 16
VOCAB = 100
IDS = torch.tensor([[1, 5, 7, 9, 11]])


# --- tiny checkpoints, saved the way their authors' code saves them ----------------------


def save_tokenizer(directory: Path) -> None:
    """A 100-token word-level tokenizer: enough for ``load_model`` and ``get_vocab``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=64, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_causal_lm(directory: Path, *, sharded: bool = False, pickled: bool = False,
                   seed: int = 0) -> LlamaForCausalLM:
    """A tiny causal LM saved as ``model.safetensors``, shards with an index, or (``pickled``)
    a ``pytorch_model.bin`` written by ``torch.save`` as older code did."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval()
    if pickled:  # transformers 5 ignores safe_serialization=False: write the .bin by hand
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, **({"max_shard_size": "10KB"} if sharded else {}))
    save_tokenizer(directory)
    return model


def random_head(width: int = HIDDEN, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.eye(width) + 0.3 * torch.randn(width, width, generator=generator)
    return weight, 0.3 * torch.randn(width, generator=generator)


def save_head(directory: Path, weight: torch.Tensor, bias: torch.Tensor | None, *,
              name: str = "value_head.safetensors", prefix: str = "pretrained_model.") -> None:
    """A value-head file with TRL's key names (``prefix`` "" for unprefixed keys)."""
    state = {f"{prefix}v_head.summary.weight": weight}
    if bias is not None:
        state[f"{prefix}v_head.summary.bias"] = bias
    if name.endswith(".safetensors"):
        save_file(state, str(directory / name))
    else:
        torch.save(state, directory / name)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    save_causal_lm(directory)
    return directory


def final_hidden(model: LlamaForCausalLM) -> torch.Tensor:
    """The final normed hidden state at the last position: what PAD's head reads."""
    with torch.no_grad():
        return model.model(input_ids=IDS).last_hidden_state[0, -1]


# --- pad-released -------------------------------------------------------------------------


def test_pad_released_sharded_with_a_prefixed_head_decodes_as_the_head_says(tmp_path):
    original = save_causal_lm(tmp_path, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    weight, bias = random_head()
    save_head(tmp_path, weight, bias)

    checkpoint = inspect_guide(tmp_path)
    assert checkpoint.layout == "pad-released" and checkpoint.layout in GUIDE_LAYOUTS
    assert (checkpoint.path, checkpoint.model, checkpoint.adapter) == (str(tmp_path),
                                                                      str(tmp_path), None)
    assert checkpoint.default_reference == "base"
    assert checkpoint.warnings == ()
    assert torch.equal(checkpoint.head[0], weight) and torch.equal(checkpoint.head[1], bias)
    assert checkpoint.head[0].dtype == checkpoint.head[1].dtype == torch.float32

    guide = load_guide_model(checkpoint, dtype="float32", device="cpu")
    hidden = final_hidden(guide.model)
    assert torch.allclose(hidden, final_hidden(original))  # the shards reassembled faithfully

    lm_head = guide.model.lm_head.weight.detach()
    head = ValueHead(HIDDEN)
    with torch.no_grad():
        head.weight.copy_(checkpoint.head[0])
        head.bias.copy_(checkpoint.head[1])
    persrm = PersonalizedRewardModel(PersRMConfig(base_model="tiny", hidden_size=HIDDEN), head)
    tokens = [3, 10, 42, 99]
    at_candidates = persrm.reward_logits(hidden[None], lm_head, torch.tensor([tokens]))[0]
    everywhere = persrm.reward_logits(hidden[None], lm_head)[0]
    for column, token in enumerate(tokens):  # brute force: E_t . (W h + b), in float64 loops
        h, w, b, e = (x.double().tolist() for x in (hidden, weight, bias, lm_head[token]))
        transformed = [sum(w[j][i] * h[i] for i in range(HIDDEN)) + b[j] for j in range(HIDDEN)]
        expected = sum(e[j] * transformed[j] for j in range(HIDDEN))
        assert at_candidates[column].item() == pytest.approx(expected, abs=1e-4)
        assert everywhere[token].item() == pytest.approx(expected, abs=1e-4)


def test_pickled_model_weights_and_value_head_load_as_pad_released(tmp_path):
    original = save_causal_lm(tmp_path, pickled=True)
    assert not list(tmp_path.glob("*.safetensors"))
    weight, bias = random_head(seed=2)
    save_head(tmp_path, weight, bias, name="value_head.bin")

    checkpoint = inspect_guide(tmp_path)
    assert checkpoint.layout == "pad-released"
    assert torch.equal(checkpoint.head[0], weight) and torch.equal(checkpoint.head[1], bias)
    guide = load_guide_model(checkpoint, dtype="float32", device="cpu")
    assert torch.allclose(final_hidden(guide.model), final_hidden(original))


def test_unprefixed_head_keys_are_accepted(tmp_path):
    save_causal_lm(tmp_path)
    weight, bias = random_head(seed=3)
    save_head(tmp_path, weight, bias, prefix="")
    head = inspect_guide(tmp_path).head
    assert torch.equal(head[0], weight) and torch.equal(head[1], bias)
    assert torch.equal(read_value_head(tmp_path, HIDDEN)[0], weight)


def test_a_bfloat16_head_is_returned_as_float32(tmp_path):
    weight, bias = random_head(seed=4)
    save_head(tmp_path, weight.bfloat16(), bias.bfloat16(), name="value_head.bin")
    read = read_value_head(tmp_path, HIDDEN)
    assert read[0].dtype == read[1].dtype == torch.float32
    assert torch.equal(read[0], weight.bfloat16().float())


def test_both_head_files_prefer_safetensors_and_warn(tmp_path):
    save_causal_lm(tmp_path)
    weight, bias = random_head(seed=5)
    save_head(tmp_path, weight, bias)
    save_head(tmp_path, torch.eye(HIDDEN), torch.zeros(HIDDEN), name="value_head.bin")
    checkpoint = inspect_guide(tmp_path)
    assert torch.equal(checkpoint.head[0], weight)
    assert len(checkpoint.warnings) == 1
    assert "value_head.safetensors and value_head.bin" in checkpoint.warnings[0]


# --- causal-lm ----------------------------------------------------------------------------


def test_a_causal_lm_without_a_head_is_a_causal_lm_guide(base_dir):
    assert read_value_head(base_dir, HIDDEN) is None
    checkpoint = inspect_guide(str(base_dir))
    assert checkpoint.layout == "causal-lm"
    assert checkpoint.head is None and checkpoint.adapter is None
    assert checkpoint.model == str(base_dir)
    assert checkpoint.default_reference == "guide-unconditioned"
    assert checkpoint.warnings == ()
    guide = load_guide_model(checkpoint, dtype="float32", device="cpu")
    assert isinstance(guide.model, LlamaForCausalLM)
    assert guide.name == str(base_dir)


def test_a_config_without_architectures_is_recognised_by_model_type(tmp_path):
    save_causal_lm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert inspect_guide(tmp_path).layout == "causal-lm"


# --- refused heads ------------------------------------------------------------------------


def test_a_scalar_value_head_is_refused_as_a_whole_response_scorer(tmp_path):
    save_causal_lm(tmp_path)
    save_head(tmp_path, torch.randn(1, HIDDEN), torch.zeros(1))
    with pytest.raises(PadlmError, match="value_head.safetensors") as caught:
        inspect_guide(tmp_path)
    message = str(caught.value)
    assert "scalar" in message and "ARGS / best-of-n" in message and "[1, 16]" in message


def test_a_head_of_another_width_is_refused_with_both_numbers(tmp_path):
    save_causal_lm(tmp_path)
    save_head(tmp_path, *random_head(width=24))
    with pytest.raises(PadlmError, match=r"value_head.safetensors is 24 wide but the model's "
                                         r"hidden_size is 16"):
        inspect_guide(tmp_path)


def test_a_head_file_missing_a_key_is_refused_naming_the_keys_it_has(tmp_path):
    save_causal_lm(tmp_path)
    save_head(tmp_path, torch.eye(HIDDEN), None)
    with pytest.raises(PadlmError, match=r"value_head.safetensors must hold .* it has: "
                                         r"pretrained_model.v_head.summary.weight$"):
        inspect_guide(tmp_path)


def test_unreadable_head_files_are_refused_naming_the_file(tmp_path):
    save_causal_lm(tmp_path)
    (tmp_path / "value_head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PadlmError, match="cannot read value head .*value_head.safetensors"):
        inspect_guide(tmp_path)


class NotATensor:
    """A pickled object weights_only must refuse to rebuild: loading it could run code."""


def test_a_pickled_head_with_arbitrary_objects_is_refused_not_executed(tmp_path):
    save_causal_lm(tmp_path)
    torch.save({"v_head.summary.weight": torch.eye(HIDDEN), "extra": NotATensor()},
               tmp_path / "value_head.bin")
    with pytest.raises(PadlmError, match="cannot read value head .*value_head.bin"):
        inspect_guide(tmp_path)


def test_a_head_without_its_model_is_refused(tmp_path):
    save_head(tmp_path, *random_head())
    with pytest.raises(PadlmError, match="value_head.safetensors has no config.json"):
        inspect_guide(tmp_path)


# --- refused directories ------------------------------------------------------------------


def test_a_sequence_classification_reward_model_is_refused(tmp_path):
    config = tiny_config()
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(PadlmError, match="config.json declares LlamaForSequenceClassification") \
            as caught:
        inspect_guide(tmp_path)
    assert "ARGS / best-of-n" in str(caught.value)


def test_an_encoder_is_refused_as_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                      "model_type": "bert"}))
    with pytest.raises(PadlmError, match="declares BertModel, not a causal LM"):
        inspect_guide(tmp_path)


def test_a_config_without_weights_is_refused(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(PadlmError, match="config.json but no model weights"):
        inspect_guide(tmp_path)


def test_an_unusable_directory_a_file_and_a_missing_path_are_refused(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(PadlmError, match="is not a guide checkpoint: looked for "
                                         "adapter_config.json .*config.json .*value_head"):
        inspect_guide(tmp_path)
    with pytest.raises(PadlmError, match="is a file"):
        inspect_guide(tmp_path / "README.md")
    with pytest.raises(PadlmError, match="does not exist"):
        inspect_guide(tmp_path / "nowhere")


# --- peft-adapter -------------------------------------------------------------------------


def save_adapter(base_dir: Path, directory: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(directory)


def test_a_peft_adapter_loads_over_its_base_as_the_persrm_adapter(base_dir, tmp_path):
    from peft import PeftModel

    save_adapter(base_dir, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(base_dir)

    checkpoint = inspect_guide(tmp_path)
    assert checkpoint.layout == "peft-adapter"
    assert (checkpoint.model, checkpoint.adapter) == (str(base_dir), str(tmp_path))
    assert checkpoint.head is None and checkpoint.default_reference == "guide"

    guide = load_guide_model(checkpoint, dtype="float32", device="cpu")
    assert isinstance(guide.model, PeftModel) and not guide.model.training
    assert list(guide.model.peft_config) == [ADAPTER_NAME]
    assert guide.model.active_adapter == ADAPTER_NAME
    assert guide.name == str(tmp_path)
    base = load_model(str(base_dir), "float32", "cpu")
    with torch.no_grad():
        adapted = guide.model(input_ids=IDS).logits
        plain = base.model(input_ids=IDS).logits
        with guide.model.disable_adapter():
            disabled = guide.model(input_ids=IDS).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    assert torch.allclose(disabled, plain, atol=1e-6)  # the "guide" reference


def test_a_peft_adapter_with_a_value_head_carries_the_head(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path)
    weight, bias = random_head(seed=8)
    save_head(tmp_path, weight, bias)
    checkpoint = inspect_guide(tmp_path)
    assert checkpoint.layout == "peft-adapter" and checkpoint.warnings == ()
    assert torch.equal(checkpoint.head[0], weight)
    save_head(tmp_path, *random_head(width=8))
    with pytest.raises(PadlmError, match="8 wide but the model's hidden_size is 16"):
        inspect_guide(tmp_path)


def test_an_adapter_over_a_hub_base_warns_that_the_head_width_is_unchecked(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path)
    save_head(tmp_path, *random_head())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/some-model"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    checkpoint = inspect_guide(tmp_path)
    assert checkpoint.model == "someone/some-model"
    assert len(checkpoint.warnings) == 1 and "not checked" in checkpoint.warnings[0]


def test_an_adapter_without_its_base_model_or_weights_is_refused(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({key: value for key, value in config.items()
                    if key != "base_model_name_or_path"}))
    with pytest.raises(PadlmError, match="adapter_config.json has no base_model_name_or_path"):
        inspect_guide(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(PadlmError, match="adapter_config.json but no adapter weights"):
        inspect_guide(tmp_path)


# --- shared vocabularies ------------------------------------------------------------------


class Vocabulary:
    """The one method shared_vocabulary reads, over a plain dict."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def words(count: int, start: int = 0) -> dict[str, int]:
    return {f"t{i}": i for i in range(start, start + count)}


@pytest.fixture(scope="module")
def default_tokenizer():
    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


def test_the_same_real_tokenizer_shares_its_whole_vocabulary(default_tokenizer):
    size = len(default_tokenizer)
    assert shared_vocabulary(default_tokenizer, default_tokenizer, size, "base", "guide") == size
    padded = size + 64  # an embedding matrix padded to a multiple of 64
    assert shared_vocabulary(default_tokenizer, default_tokenizer, padded, "b", "g") == size


def test_a_guide_with_an_added_token_shares_the_base_vocabulary(default_tokenizer):
    guide = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    guide.add_tokens(["<extra_guide_token>"])
    size = len(default_tokenizer)
    assert len(guide) == size + 1
    assert shared_vocabulary(default_tokenizer, guide, size + 1, "base", "guide") == size
    # the other way round: the base's added token is past what the guide can score
    assert shared_vocabulary(guide, default_tokenizer, size, "base", "guide") == size


def test_genarm_and_qwen_shapes_on_synthetic_vocabularies():
    llama = words(32000)
    arm = {**llama, "<pad>": 32000}  # GenARM's released ARMs: one added token
    assert shared_vocabulary(Vocabulary(llama), Vocabulary(arm), 32001, "llama", "arm") == 32000
    qwen = words(151665)  # 151665 tokenizer entries, 151936 embedding rows
    assert shared_vocabulary(Vocabulary(qwen), Vocabulary(dict(qwen)), 151936, "q", "g") \
        == 151665
    # rows fewer than the tokenizer (a guide whose added tokens were never embedded)
    assert shared_vocabulary(Vocabulary(llama), Vocabulary(arm), 31990, "llama", "arm") == 31990


def test_a_150k_vocabulary_with_one_disagreement_is_refused_with_both_sizes():
    base = words(150000)
    guide = dict(base)
    guide["t70000"], guide["t70001"] = 70001, 70000  # two tokens swapped
    with pytest.raises(PadlmError) as caught:
        shared_vocabulary(Vocabulary(base), Vocabulary(guide), 150000, "base-m", "guide-m")
    message = str(caught.value)
    assert "guide guide-m (vocabulary 150000" in message
    assert "base base-m (vocabulary 150000)" in message
    assert "id 70000 is 't70000' for the base but 't70001' for the guide" in message


def test_a_guide_missing_a_base_token_is_refused():
    base = words(300)
    guide = {**words(100), "other": 100, **words(199, start=101)}
    with pytest.raises(PadlmError, match=r"base b \(vocabulary 300\): id 100 is 't100' for the "
                                         r"base but 'other' for the guide, which has 't100' "
                                         "nowhere"):
        shared_vocabulary(Vocabulary(base), Vocabulary(guide), 300, "b", "g")


def test_a_different_real_tokenizer_is_refused(default_tokenizer, tmp_path):
    save_tokenizer(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(PadlmError, match=r"vocabulary 100, 100 rows\) does not share the "
                                         r"tokenizer of base smol \(vocabulary 49152\)"):
        shared_vocabulary(default_tokenizer, other, VOCAB, "smol", "tiny")


def test_an_adapter_that_does_not_fit_its_base_is_refused_at_loading(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path / "adapter")
    wider = tmp_path / "wider"
    config = tiny_config()
    config.hidden_size, config.intermediate_size = 24, 48
    LlamaForCausalLM(config).save_pretrained(wider)
    save_tokenizer(wider)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(wider)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    checkpoint = inspect_guide(tmp_path / "adapter")
    with pytest.raises(PadlmError, match=f"adapter {tmp_path / 'adapter'} does not load onto "
                                         f"{wider}: Error.* size mismatch"):
        load_guide_model(checkpoint, dtype="float32", device="cpu")
