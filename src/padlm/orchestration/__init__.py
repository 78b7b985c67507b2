"""Orchestration (MoPE, Zhou et al. 2024): frozen per-dimension experts mixed per token by a
Preference Control Model trained with REBEL; Personalized Soups as its baseline.

The package itself imports nothing heavy (``padlm train --help`` must not load torch). Its
``padlm.plugins`` entry point, :func:`register`, adds the ``mix`` and ``soups`` strategies and
the ``dimensions`` scorer to padlm's registry: the decode kernel never names orchestration.
"""


def register() -> None:
    """Called by :func:`padlm.core.registry.load_registry` (the strategy classes register as their
    module imports)."""
    import padlm.orchestration.strategies  # noqa: F401
    from padlm.core.registry import register_scorer
    from padlm.orchestration.scoring import dimension_scorer

    register_scorer("dimensions", dimension_scorer)
