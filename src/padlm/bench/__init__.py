"""padlm's benchmarks, one module each, on one kit (:mod:`padlm.bench.kit`): the same clock,
ratios to a baseline of the same run, one table renderer and one record writer.

``strategies`` (``padlm bench``), ``serve`` (``padlm bench serve``), ``sampler`` (``padlm
bench sampler``), ``vllm_dp`` (``padlm bench vllm-dp``) and ``engines`` (``python -m
padlm.bench.engines``). Nothing is imported here: ``serve`` is loaded when the CLI starts,
and the others load torch or vLLM.
"""
