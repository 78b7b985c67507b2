"""Load: 200 requests from 16 concurrent clients with mixed preferences on the real model.

Zero errors, every choice complete, and nothing left behind in the decode worker afterwards
(no live rows, no waiting jobs, no finished rows or row owners kept). A few tokens per request
keep it to about a minute on two CPU cores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from padlm import Personalizer
from padlm.server.app import ServerThread, create_app

REQUESTS = 200
CONCURRENCY = 16
PREFERENCES = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B", "P1A+P2A", "helpful", None,
               "Answer like a sports commentator."]
STRATEGIES = ["pad"] * 8 + ["prompt", "base"]
PROMPTS = ["Why is the sky blue?", "Name a fruit.", "How do magnets work?", "Say hello.",
           "What is rain?"]


@pytest.mark.slow
def test_200_requests_at_concurrency_16(default_lm):
    engine = Personalizer(default_lm, persrm="identity")
    app = create_app(engine, max_batch_size=16, max_queue=64)
    worker = app.state.service.worker
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=300)

        def one(i: int) -> tuple[int, int]:
            kwargs = {"model": server.model, "max_tokens": 3 + i % 2,
                      "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                      "temperature": 0.7 if i % 4 == 0 else 0.0, "seed": i,
                      "extra_body": {"preference": PREFERENCES[i % len(PREFERENCES)],
                                     "strategy": STRATEGIES[i % len(STRATEGIES)],
                                     "pad": {"weight": 0.5 + (i % 3) * 0.5}}}
            if i % 2:  # half of the clients stream
                chunks = list(client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs))
                assert chunks[-1].usage is not None
                assert [c for c in chunks if c.choices][-1].choices[0].finish_reason
                return i, chunks[-1].usage.completion_tokens
            response = client.chat.completions.create(**kwargs)
            assert response.choices[0].finish_reason in ("stop", "length")
            return i, response.usage.completion_tokens

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(REQUESTS)))  # re-raises any client error

        assert len(results) == REQUESTS
        assert all(1 <= tokens <= 3 + i % 2 for i, tokens in results)
        health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["live_rows"] == 0 and health["waiting"] == 0
    assert worker.stats["rows_finished"] == REQUESTS
    assert worker.stats["jobs_done"] == REQUESTS and worker.stats["jobs_failed"] == 0
    assert worker.stats["rows_cancelled"] == 0
    assert worker.stats["max_live_rows"] > CONCURRENCY // 2  # the users really shared batches
    assert all(not batch.rows and not batch.finished for batch in worker.batches.values())
    assert not worker._owners
