"""Orchestration (MoPE, Zhou et al. 2024): frozen per-dimension experts mixed per token by a
Preference Control Model trained with REBEL; Personalized Soups as its baseline.

Importing this package registers the ``mix`` and ``soups`` strategies.
"""

from padlm.orchestration import strategies as _strategies  # noqa: F401  (registers)
from padlm.orchestration.experts import Experts, load_experts

__all__ = ["Experts", "load_experts"]
