"""padlm's kernel: per-request settings, the strategy registry, the guidance math, the KV
streams, the decode loop, the built-in strategies, the PersRM and its resolver, models and
the engine that holds them, and the one request planner. It imports no feature package
(orchestration, server, vLLM, training, evaluation, data, judges, CLI, benchmarks); features
plug in through the ``padlm.plugins`` entry point (see :mod:`padlm.core.registry`)."""
