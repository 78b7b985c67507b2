"""A long prompt must not freeze everyone (issue 30, Found 1), on the real default model with
its shipped PersRM: the prompt is prefilled a chunk at a time between the other rows' steps,
so an open stream keeps flowing, and the long request obeys its own deadline. Times are
asserted relative to the same prompt's prefill measured alone in the same run, never as
absolute numbers."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from padlm import Personalizer
from padlm.server.app import ServerThread, create_app

LONG_PROMPT = " ".join(f"item{i} is red." for i in range(300))  # about 2,100 tokens
LONG = {"messages": [{"role": "user", "content": LONG_PROMPT}], "preference": "P1A",
        "strategy": "pad", "max_tokens": 1}
VICTIM = {"messages": [{"role": "user", "content": "Tell me a story about a fox."}],
          "preference": "P1A", "strategy": "pad", "max_tokens": 48, "ignore_eos": True,
          "stream": True}
CHUNK = 128


def arrivals(url: str, body: dict, started: threading.Event | None = None
             ) -> tuple[list[float], list[str]]:
    """A streamed request: when each content chunk arrived, and every ``data:`` payload."""
    times, payloads = [], []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            payloads.append(line[6:])
            if line[6:] == "[DONE]":
                break
            if any(c.get("delta", {}).get("content") for c in
                   json.loads(line[6:]).get("choices", [])):
                times.append(time.monotonic())
                if started is not None:
                    started.set()
    return times, payloads


def gaps_of(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def timed_chat(url: str, body: dict) -> tuple[float, httpx.Response]:
    began = time.monotonic()
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    return time.monotonic() - began, reply


@pytest.fixture(scope="module")
def engine(default_lm):
    return Personalizer(default_lm, persrm="default")


@pytest.fixture(scope="module")
def prefill_alone(engine) -> float:
    """Seconds the long prompt takes alone (a warm-up request first)."""
    with ServerThread(create_app(engine, prefill_chunk_tokens=CHUNK)) as server:
        timed_chat(server.url, {**VICTIM, "stream": False, "max_tokens": 2})
        seconds, reply = timed_chat(server.url, LONG)
        assert reply.status_code == 200, reply.text
    return seconds


def test_a_stream_keeps_flowing_beside_a_long_prompt(engine, prefill_alone):
    """Without chunked prefill the victim's longest gap is the whole prefill."""
    with ServerThread(create_app(engine, prefill_chunk_tokens=CHUNK)) as server:
        solo, _ = arrivals(server.url, VICTIM)
        started, result = threading.Event(), {}
        victim = threading.Thread(target=lambda: result.update(v=arrivals(server.url, VICTIM,
                                                                          started)))
        victim.start()
        assert started.wait(60)
        seconds, reply = timed_chat(server.url, LONG)
        victim.join(300)
    times, payloads = result["v"]
    assert reply.status_code == 200, reply.text
    assert payloads[-1] == "[DONE]" and not any('"error"' in p for p in payloads)
    gaps, solo_gaps = gaps_of(times), gaps_of(solo)
    print(f"prefill alone {prefill_alone:.2f} s, beside the victim {seconds:.2f} s; victim's "
          f"longest gap {max(gaps):.3f} s (alone {max(solo_gaps):.3f} s)")
    assert max(gaps) < prefill_alone / 3


def test_a_long_prompt_obeys_its_own_deadline(engine, prefill_alone):
    """Before: the request ended in its first step, never checked, and got a 200 after the
    whole prefill."""
    timeout = max(prefill_alone / 4, 0.5)
    app = create_app(engine, prefill_chunk_tokens=CHUNK, request_timeout_s=timeout)
    with ServerThread(app) as server:
        seconds, reply = timed_chat(server.url, LONG)
        worker = app.state.service.worker
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout"
        assert seconds < prefill_alone * 0.75
        deadline = time.monotonic() + 30
        while worker.live_rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.live_rows == 0  # its rows left mid-prefill


def test_a_client_that_leaves_stops_its_prefill(engine, prefill_alone):
    app = create_app(engine, prefill_chunk_tokens=CHUNK)
    worker = app.state.service.worker
    with ServerThread(app) as server:
        host, port = server.url.removeprefix("http://").split(":")
        data = json.dumps(LONG).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(data), data))
            deadline = time.monotonic() + 60
            while not worker.batches.get("pad") or not worker.batches["pad"].prefilling:
                assert time.monotonic() < deadline, "the prefill never started"
                time.sleep(0.02)
        left = time.monotonic()
        while worker.live_rows and time.monotonic() - left < prefill_alone:
            time.sleep(0.02)
        assert worker.live_rows == 0 and time.monotonic() - left < prefill_alone / 3
        assert worker.stats["rows_cancelled"] >= 1
