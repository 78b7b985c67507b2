"""padlm: personalize a frozen language model at decoding time (PAD and its baselines).

Names resolve on first use, so ``import padlm`` (and ``padlm --help``) does not pay for torch
and transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "GenerationConfig": "padlm.config",
    "PadlmError": "padlm.errors",
    "Request": "padlm.decoding",
    "Generation": "padlm.engine",
    "Personalizer": "padlm.engine",
    "available_strategies": "padlm.engine",
    "LoadedModel": "padlm.models",
    "load_model": "padlm.models",
    "PersRMConfig": "padlm.persrm",
    "PersonalizedRewardModel": "padlm.persrm",
    "ValueHead": "padlm.persrm",
}
__all__ = [
    "Generation", "GenerationConfig", "LoadedModel", "PadlmError", "PersRMConfig",
    "PersonalizedRewardModel", "Personalizer", "Request", "ValueHead", "available_strategies",
    "load_model",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from padlm.config import GenerationConfig
    from padlm.decoding import Request
    from padlm.engine import Generation, Personalizer, available_strategies
    from padlm.errors import PadlmError
    from padlm.models import LoadedModel, load_model
    from padlm.persrm import PersonalizedRewardModel, PersRMConfig, ValueHead


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'padlm' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
