"""PAD inside vLLM: a plugin (model classes + a logits processor) and an engine adapter.

Importing this package imports nothing from vLLM: vLLM imports :mod:`padlm.vllm.model` and
:mod:`padlm.vllm.processor` itself, in its own processes. What a vLLM engine needs to run PAD:

- the model registered under a padlm architecture name: :func:`register` does it in every vLLM
  process, as the ``vllm.general_plugins`` entry point ``padlm`` in pyproject.toml;
- ``hf_overrides={"architectures": ["PadlmLlamaForCausalLM"]}`` (or ``PadlmQwen2ForCausalLM``),
  ``additional_config={"padlm": {"persrm": DIR}}`` (a conditioned, head-only PersRM) and
  ``logits_processors=["padlm.vllm.processor:PadLogitsProcessor"]``;
- per request, ``SamplingParams(extra_args={"padlm": {"weight": 0.8, "top_k": 10}})``, or over
  HTTP ``"vllm_xargs": {"padlm_weight": 0.8}``.

:mod:`padlm.vllm.engine` sets all of this up from padlm's own arguments.
"""

from __future__ import annotations

from padlm.vllm.requests import ARCHITECTURES


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts
    (so the engine core and the workers know the classes too), possibly more than once;
    registering by ``module:class`` name keeps vLLM from importing the model code until a
    padlm architecture is asked for."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():  # each class is named as its architecture
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"padlm.vllm.model:{name}")
