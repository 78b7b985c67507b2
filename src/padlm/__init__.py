"""padlm: personalize a frozen language model at decoding time (PAD and its baselines)."""

from padlm.decoding import GenerationConfig, Request
from padlm.engine import STRATEGIES, Generation, Personalizer
from padlm.errors import PadlmError
from padlm.models import LoadedModel, load_model
from padlm.persrm import PersonalizedRewardModel, PersRMConfig, ValueHead

__all__ = [
    "STRATEGIES", "Generation", "GenerationConfig", "LoadedModel", "PadlmError",
    "PersRMConfig", "PersonalizedRewardModel", "Personalizer", "Request", "ValueHead",
    "load_model",
]
__version__ = "0.1.0"
