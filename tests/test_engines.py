"""``open_engine``: one door to either engine; vLLM refuses padlm-loop-only settings, all at
once and before anything loads."""

from __future__ import annotations

import pytest
from test_checkpoints import save_causal_lm

from padlm.core.engine import Personalizer
from padlm.engines import open_engine
from padlm.errors import PadlmError


def test_vllm_refuses_every_hf_only_setting_at_once_before_loading():
    with pytest.raises(PadlmError) as refused:
        open_engine("vllm", "/no/such/model", device="cpu", scorer="persrm",
                    reference="guide-unconditioned")
    message = str(refused.value)
    assert "--device, --scorer, --reference apply to --engine hf" in message
    assert refused.value.param == "engine"


def test_an_unknown_engine_is_refused():
    with pytest.raises(PadlmError, match="--engine must be hf or vllm"):
        open_engine("tgi")


def test_hf_opens_padlm_own_loop_with_every_setting(tmp_path):
    save_causal_lm(tmp_path)
    engine = open_engine("hf", str(tmp_path), persrm="identity", device="cpu",
                         reference="base")
    assert isinstance(engine, Personalizer) and engine.engine_name == "hf"
    assert engine.model_name == str(tmp_path) and engine.persrm.reference == "base"
