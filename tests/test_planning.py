"""A server request is rendered once: the planner renders each prompt's contexts (every lane
of every stream) one time and the rows carry them to the decode thread, which renders
nothing again, however many rows (n, best_of) the request has."""

from __future__ import annotations

import httpx
import pytest

from padlm import Personalizer
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
