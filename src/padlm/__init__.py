"""padlm: personalize a frozen language model at decoding time (PAD and its baselines).

Names resolve on first use, so ``import padlm`` (and ``padlm --help``) does not pay for torch
and transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "GenerationConfig": "padlm.core.config",
    "PadlmError": "padlm.errors",
    "Request": "padlm.core.decoding",
    "Generation": "padlm.core.engine",
    "Personalizer": "padlm.core.engine",
    "available_strategies": "padlm.core.engine",
    "LoadedModel": "padlm.core.models",
    "load_model": "padlm.core.models",
    "PersRMConfig": "padlm.core.persrm",
    "PersonalizedRewardModel": "padlm.core.persrm",
    "ValueHead": "padlm.core.persrm",
}
__all__ = [
    "Generation", "GenerationConfig", "LoadedModel", "PadlmError", "PersRMConfig",
    "PersonalizedRewardModel", "Personalizer", "Request", "ValueHead", "available_strategies",
    "load_model",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from padlm.core.config import GenerationConfig
    from padlm.core.decoding import Request
    from padlm.core.engine import Generation, Personalizer, available_strategies
    from padlm.core.models import LoadedModel, load_model
    from padlm.core.persrm import PersonalizedRewardModel, PersRMConfig, ValueHead
    from padlm.errors import PadlmError


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'padlm' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
