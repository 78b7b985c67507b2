"""Shared fixtures: the real default model (session-wide) and a tiny random model.

The tiny model uses the default model's real tokenizer and chat template with a 2-layer,
32-wide random Llama, so unit tests exercise the real code paths in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from padlm.core.engine import Personalizer
from padlm.core.models import LoadedModel, ensure_default_model, load_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_lm() -> LoadedModel:
    """SmolLM2-135M-Instruct, converted once into $PADLM_HOME."""
    return load_model("default")


@pytest.fixture(scope="session")
def default_engine(default_lm: LoadedModel) -> Personalizer:
    return Personalizer(default_lm, persrm="identity")


@pytest.fixture(scope="session")
def tiny_lm(tiny_cpu_lm: LoadedModel) -> LoadedModel:
    return tiny_cpu_lm


@pytest.fixture(scope="session")
def tiny_cpu_lm() -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-random-llama")


@pytest.fixture
def tiny_engine(tiny_lm: LoadedModel) -> Personalizer:
    return Personalizer(tiny_lm, persrm="identity")


@pytest.fixture
def serve(tiny_lm):
    """``serve(**settings)``: a live server on the tiny model with those settings, as
    ``(ServerThread, Service)`` (closed afterwards)."""
    from padlm.server.app import ServerThread, create_app

    servers = []

    def start(**settings):
        app = create_app(Personalizer(tiny_lm, persrm="identity"), **settings)
        server = ServerThread(app).__enter__()
        servers.append(server)
        return server, app.state.service

    yield start
    for server in servers:
        server.__exit__()


class TextFeatures:
    """Profile features read off the text, so a test knows which way a choice points: P1
    (simple) falls with long words, P2 (concise) with words, P3 (friendly) rises with
    exclamation marks. No reward model loads."""

    def __call__(self, prompts, responses):
        return [[-sum(len(w) > 8 for w in r.split()) / 4, -len(r.split()) / 20,
                 r.count("!") / 2] for r in responses]


@pytest.fixture
def text_profiles(tmp_path):
    """Profiles in a fresh SQLite store, learning on :class:`TextFeatures`."""
    from padlm.profiles.service import ProfileService
    from padlm.profiles.store import open_store

    service = ProfileService(open_store(f"sqlite:///{tmp_path / 'profiles.db'}"),
                             TextFeatures())
    yield service
    service.store.close()


@pytest.fixture(scope="session")
def guide_dir(tiny_cpu_lm, tmp_path_factory) -> Path:
    """A second tiny model (48 wide, 3 layers) with the base's tokenizer, saved as a plain
    causal LM directory."""
    directory = tmp_path_factory.mktemp("guide")
    config = LlamaConfig(
        vocab_size=len(tiny_cpu_lm.tokenizer), hidden_size=48, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tiny_cpu_lm.tokenizer.eos_token_id,
        pad_token_id=tiny_cpu_lm.tokenizer.pad_token_id)
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(directory)
    tiny_cpu_lm.tokenizer.save_pretrained(directory)
    return directory
