"""A server request is rendered once: the planner renders each prompt's contexts (every lane
of every stream) one time and the rows carry them to the decode thread, which renders
nothing again, however many rows (n, best_of) the request has."""

from __future__ import annotations

import httpx
import pytest
import torch

from padlm import GenerationConfig, Personalizer
from padlm.core.planning import expansion
from padlm.server.app import ServerThread, create_app


@pytest.mark.parametrize("body", [
    {"strategy": "pad", "n": 3},
    {"strategy": "best-of-n", "best_of": 3, "n": 2, "temperature": 0.7},
])
def test_each_prompt_is_rendered_once_per_request(tiny_lm, monkeypatch, body):
    engine = Personalizer(tiny_lm, persrm="identity")
    renders = []
    with ServerThread(create_app(engine)) as server:
        strategy = engine.strategy(body["strategy"])
        rendering = getattr(strategy, "sampler", None)
        rendering = engine.strategy(rendering) if rendering else strategy
        original = rendering.contexts
        monkeypatch.setattr(rendering, "contexts",
                            lambda request: renders.append(request) or original(request))
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Name a fruit."}], "preference": "P1A",
            "max_tokens": 3, **body})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == body["n"]
    assert len(renders) == 1  # was 1 + n (x best_of): the planner, then every row again


@pytest.mark.parametrize(("strategy", "n"), [("pad", 1), ("linear-alignment", 1),
                                              ("best-of-n", 3)])
def test_generate_plans_each_prompt_once(tiny_lm, monkeypatch, strategy, n):
    """The library's path goes through the same planner: each prompt rendered once, however
    many rows (best-of-n's samples) decode it, and the decode batch renders nothing again."""
    engine = Personalizer(tiny_lm, persrm="identity", scorer=lambda items: torch.zeros(
        len(items)))
    rows = expansion(engine, strategy).rows
    rendering = engine.strategy(rows)
    original, renders = rendering.contexts, []
    monkeypatch.setattr(rendering, "contexts",
                        lambda request: renders.append(request) or original(request))
    prompts = ["Name a fruit.", "Name a colour."]
    config = GenerationConfig(max_new_tokens=3, temperature=0.7, seed=1)
    got = engine.generate(prompts, "P1A", strategy, config, n=n)
    assert len(got) == len(prompts) and all(g.tokens for g in got)
    assert len(renders) == len(prompts)
