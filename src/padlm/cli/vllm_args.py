"""``padlm vllm-args``."""

from __future__ import annotations

from padlm.cli.options import DtypeOption, ModelOption, PersRMOption, PlacementOption


def vllm_args(
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    dtype: DtypeOption = None,
    placement: PlacementOption = None,
) -> None:
    """The flags that make vLLM's own OpenAI server run padlm's PAD (plugin model class,
    PersRM, logits processors), shell-quoted: `eval "python -m
    vllm.entrypoints.openai.api_server $(padlm vllm-args) --tensor-parallel-size 4"`
    (dtype default: this machine's)."""
    import shlex

    from padlm.core.config import GenerationConfig
    from padlm.vllm.engine import VllmPersonalizer

    engine = VllmPersonalizer(model, persrm=persrm, dtype=dtype, placement=placement)
    engine.check("pad", GenerationConfig())  # a PersRM this engine cannot run is refused
    print(shlex.join(engine.server_args()))
