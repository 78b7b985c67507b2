"""Orchestration (MoPE, Zhou et al. 2024): frozen per-dimension experts mixed per token by a
Preference Control Model trained with REBEL; Personalized Soups as its baseline.

The package itself imports nothing heavy (``padlm train --help`` must not load torch); the
``mix`` and ``soups`` strategies register when :func:`padlm.registry.load_registry` imports
:mod:`padlm.orchestration.strategies`.
"""
