"""Bounded work, fair queueing, the HTTP gate, metrics, OpenAI details and graceful shutdown
(issue 17, Found 4-8), on the tiny random model.

Requests that must stay busy for a while are sent on raw sockets (:func:`open_request`), so
closing the socket is exactly a client that goes away.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from padlm import PersonalizedRewardModel, Personalizer
from padlm.bench.serve import free_port
from padlm.server.app import ServerThread, create_app
from padlm.server.settings import LOOPBACK_HOSTS, default_allowed_hosts

HI = [{"role": "user", "content": "Hi"}]
LONG = {"messages": HI, "max_tokens": 900, "ignore_eos": True}


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def open_request(url: str, body: dict, path: str = "/v1/chat/completions") -> socket.socket:
    """A request on a raw socket: closing it is the client leaving."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def chat(url: str, body: dict, headers: dict | None = None, timeout: float = 120,
         **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=timeout, **kwargs)


# ---- bounded work --------------------------------------------------------------------------

def test_per_request_limits(serve):
    server, _ = serve(max_batch_size=4, max_n=2, max_tokens_cap=16)
    cases = [({"max_tokens": 17}, "max_tokens"), ({"n": 3}, "n"),
             ({"strategy": "best-of-n", "best_of": 3, "preference": "P1A"}, "best_of"),
             ({"strategy": "best-of-n", "best_of": 2, "n": 2, "max_tokens": 2,
               "preference": "P1A"}, None)]
    for extra, param in cases:
        response = chat(server.url, {"messages": HI, "max_tokens": 4, **extra})
        if param is None:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 400 and response.json()["error"]["param"] == param
    too_many = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": ["a", "b"], "n": 2, "best_of": 2, "strategy": "best-of-n", "max_tokens": 2})
    assert too_many.status_code == 400 and "rows" in too_many.json()["error"]["message"]
    default = chat(server.url, {"messages": HI, "ignore_eos": True})  # capped, not 128
    assert default.json()["usage"]["completion_tokens"] == 16


def test_body_size_limit(serve):
    server, _ = serve(max_body_bytes=2000)
    body = {"messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 2}
    declared = chat(server.url, body)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                         headers={"content-type": "application/json"},
                         content=iter([json.dumps(body).encode()]))
    assert chunked.status_code == 413
    assert chat(server.url, {"messages": HI, "max_tokens": 2}).status_code == 200


def test_queue_admits_by_tokens_and_429_says_when_to_retry(serve):
    """A waiting request weighs its prompt's prefill (``p`` tokens, one lane: base) plus its
    max_tokens."""
    probe, _ = serve()
    p = chat(probe.url, {"messages": HI, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    server, service = serve(max_batch_size=1, max_queue=8, max_queue_tokens=100 + 2 * p)
    worker = service.worker
    busy = open_request(server.url, LONG)
    wait_until(lambda: worker.live_rows == 1)
    results: dict = {}
    waiting = [threading.Thread(target=lambda key=key, tokens=tokens: results.update(
        {key: chat(server.url, {"messages": HI, "max_tokens": tokens})}))
        for key, tokens in (("a", 60), ("c", 30))]
    waiting[0].start()
    wait_until(lambda: worker.snapshot()["queued_tokens"] == 60 + p)
    refused = chat(server.url, {"messages": HI, "max_tokens": 60})  # 2 (60 + p) > 100 + 2p
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    waiting[1].start()  # 60 + p + 30 + p fits
    wait_until(lambda: worker.snapshot()["queued_tokens"] == 90 + 2 * p)
    busy.close()
    for thread in waiting:
        thread.join(120)
    assert results["a"].status_code == results["c"].status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_clients_that_leave_leave_the_queue_at_once(serve, stream):
    server, service = serve(max_batch_size=1, max_queue=3)
    worker = service.worker
    busy = open_request(server.url, LONG)
    wait_until(lambda: worker.live_rows == 1)
    queued = [open_request(server.url, {**LONG, "stream": stream}) for _ in range(3)]
    wait_until(lambda: worker.snapshot()["waiting"] == 3)
    assert chat(server.url, {"messages": HI, "max_tokens": 2}).status_code == 429
    for sock in queued:
        sock.close()
    wait_until(lambda: worker.snapshot()["waiting"] == 0, timeout=3)
    assert worker.snapshot()["queued_tokens"] == 0 and worker.live_rows == 1
    again = open_request(server.url, LONG)  # the queue has room again
    wait_until(lambda: worker.snapshot()["waiting"] == 1)
    again.close()
    busy.close()
    wait_until(lambda: worker.live_rows == 0 and worker.snapshot()["waiting"] == 0)


def test_a_request_that_fits_runs_before_one_that_does_not(serve):
    """Two rows busy, a 4-row request waits for all four; a 1-row request arriving after it
    runs at once in a free row (no head-of-line blocking)."""
    server, service = serve(max_batch_size=4)
    worker = service.worker
    busy = open_request(server.url, {**LONG, "n": 2})
    wait_until(lambda: worker.live_rows == 2)
    big = open_request(server.url, {**LONG, "n": 4})
    wait_until(lambda: worker.snapshot()["waiting"] == 1)
    began = time.perf_counter()
    small = chat(server.url, {"messages": HI, "max_tokens": 3})
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] <= 3
    assert worker.snapshot()["waiting"] == 1 and worker.live_rows == 2  # big still waits
    print(f"1-row request beside a waiting 4-row one: {time.perf_counter() - began:.2f} s")
    busy.close()
    wait_until(lambda: worker.live_rows == 4)  # now the big one runs
    big.close()
    wait_until(lambda: worker.live_rows == 0)


def test_requests_past_the_deadline_end_with_504(serve):
    server, service = serve(request_timeout_s=1.0)
    worker = service.worker
    began = time.perf_counter()
    late = chat(server.url, LONG)
    assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
    assert time.perf_counter() - began < 10
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={**LONG, "stream": True}) as response:
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "request_timeout"
    wait_until(lambda: worker.live_rows == 0)


# ---- the gate ------------------------------------------------------------------------------

def test_api_key(serve):
    server, _ = serve(api_keys=("sekret",))
    body = {"messages": HI, "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
        refused = chat(server.url, body, headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"] == {
            "message": refused.json()["error"]["message"], "type": "invalid_request_error",
            "param": None, "code": "invalid_api_key"}
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert chat(server.url, body, {"authorization": "Bearer sekret"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    assert "api-key" in httpx.get(server.url).text  # the playground asks for the key
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
    assert client.chat.completions.create(model=server.model, messages=HI,
                                          max_tokens=2).choices[0].message.content is not None


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_post_needs_a_json_content_type(serve, content_type):
    server, service = serve()
    worker = service.worker
    headers = {} if content_type is None else {"content-type": content_type}
    done = worker.stats["jobs_done"]
    refused = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
                         content=json.dumps({"messages": HI, "max_tokens": 2}))
    assert refused.status_code == 415
    assert refused.json()["error"]["code"] == "unsupported_media_type"
    assert worker.stats["jobs_done"] == done  # nothing was decoded
    fine = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      headers={"content-type": "application/json; charset=utf-8"},
                      content=json.dumps({"messages": HI, "max_tokens": 2}))
    assert fine.status_code == 200


def test_allowed_hosts(serve):
    assert default_allowed_hosts("127.0.0.1") == LOOPBACK_HOSTS
    assert default_allowed_hosts("localhost") == LOOPBACK_HOSTS
    assert default_allowed_hosts("0.0.0.0") is None
    server, _ = serve(allowed_hosts=LOOPBACK_HOSTS)
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        refused = httpx.get(f"{server.url}/health", headers={"host": host})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_host"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:8000"):
        assert httpx.get(f"{server.url}/health", headers={"host": host}).status_code == 200


def test_cors_only_when_configured(serve):
    preflight = {"origin": "http://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    plain, _ = serve()
    closed = httpx.options(f"{plain.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    server, _ = serve(cors_origins=("http://app.example",), api_keys=("k",))
    opened = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert opened.status_code == 200
    assert opened.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(f"{server.url}/v1/chat/completions",
                          headers={**preflight, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_request_id(serve):
    server, _ = serve(api_keys=("k",))
    echoed = httpx.get(f"{server.url}/health", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    made = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    replaced = httpx.get(f"{server.url}/health", headers={"x-request-id": "no spaces, please"})
    assert replaced.headers["x-request-id"] != "no spaces, please"
    assert chat(server.url, {}, {"x-request-id": "r-401"}).headers["x-request-id"] == "r-401"


def test_access_log_lines_are_json(serve, caplog):
    server, _ = serve()
    with caplog.at_level("INFO", logger="padlm.access"):
        httpx.get(f"{server.url}/health", headers={"x-request-id": "logged-1"})
        # the gate writes its line once the response has been sent: the client may be first
        wait_until(lambda: any(r.name == "padlm.access" for r in caplog.records), 10)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "padlm.access"]
    assert {"request_id": "logged-1", "method": "GET", "path": "/health",
            "status": 200}.items() <= lines[-1].items()


def metric_samples(url: str) -> dict:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families for sample in family.samples}


def test_metrics_in_prometheus_format(serve):
    server, _ = serve()
    model = (("model_name", server.model),)
    before = metric_samples(server.url)
    assert before[("vllm:num_requests_running", model)] == 0
    assert before[("vllm:num_requests_waiting", model)] == 0
    assert chat(server.url, {"messages": HI, "max_tokens": 5, "ignore_eos": True}
                ).status_code == 200
    assert chat(server.url, {"messages": HI, "max_tokens": 0}).status_code == 400
    after = metric_samples(server.url)
    tokens = ("vllm:generation_tokens_total", model)
    assert after[tokens] - before.get(tokens, 0) == 5
    assert after[("vllm:time_to_first_token_seconds_count", model)] >= 1
    assert after[("vllm:inter_token_latency_seconds_count", model)] >= 4
    assert after[("vllm:e2e_request_latency_seconds_count", model)] >= 1
    assert after[("vllm:request_success_total",
                  (("finished_reason", "length"), *model))] >= 1
    assert after[("vllm:prompt_tokens_total", model)] > 0
    chat_route = (("handler", "/v1/chat/completions"), ("method", "POST"))
    assert after[("http_requests_total", (*chat_route, ("status", "200")))] >= 1
    assert after[("http_requests_total", (*chat_route, ("status", "400")))] >= 1
    assert ("padlm:live_rows", model) in after and ("padlm:queued_tokens", model) in after


def test_an_invented_http_method_does_not_become_a_metrics_label(serve):
    """Any client, even one the Host check refuses, could otherwise grow /metrics per request."""
    server, _ = serve(allowed_hosts=LOOPBACK_HOSTS)
    for n in range(5):
        httpx.request(f"X{n:04d}PROBE", f"{server.url}/x", headers={"host": "evil.example"})
    samples = metric_samples(server.url)
    methods = {dict(labels).get("method") for (name, labels) in samples
               if name == "http_requests_total"}
    assert "other" in methods and not any(m.endswith("PROBE") for m in methods if m)


# ---- OpenAI and vLLM details ---------------------------------------------------------------

def test_models_by_id_unknown_models_and_aliases(serve):
    server, _ = serve()
    card = httpx.get(f"{server.url}/v1/models/{server.model}")
    assert card.status_code == 200 and card.json()["id"] == server.model
    missing = httpx.get(f"{server.url}/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    unknown = chat(server.url, {"model": "gpt-4o", "messages": HI, "max_tokens": 2})
    assert unknown.status_code == 404
    assert unknown.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}
    aliased, _ = serve(served_model_names=("org/alias-a", "alias-b"))
    listed = httpx.get(f"{aliased.url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["org/alias-a", "alias-b"]
    assert httpx.get(f"{aliased.url}/v1/models/org/alias-a").status_code == 200
    answer = chat(aliased.url, {"model": "alias-b", "messages": HI, "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["model"] == "alias-b"
    assert chat(aliased.url, {"model": server.model, "messages": HI, "max_tokens": 2}
                ).status_code == 404


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_unsupported_fields_are_400s_naming_them(serve, extra, param):
    server, _ = serve()
    refused = chat(server.url, {"messages": HI, "max_tokens": 2, **extra})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    neutral = chat(server.url, {"messages": HI, "max_tokens": 2, "tool_choice": "none",
                                "response_format": {"type": "text"}})
    assert neutral.status_code == 200


def test_no_absolute_path_in_any_response(tiny_lm, tmp_path):
    """A model and a PersRM loaded from directories are named by their last path part."""
    model_dir, persrm_dir = tmp_path / "tiny-model", tmp_path / "my-persrm"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    PersonalizedRewardModel.identity(str(model_dir), tiny_lm.model.config.hidden_size
                                     ).save(persrm_dir)
    engine = Personalizer(str(model_dir), persrm=str(persrm_dir), device="cpu")
    with ServerThread(create_app(engine)) as server:
        texts = [httpx.get(f"{server.url}{path}").text
                 for path in ("/v1/padlm/presets", "/v1/models", "/health", "/metrics")]
        answer = chat(server.url, {"messages": HI, "max_tokens": 2})
        texts.append(answer.text)
        assert httpx.get(f"{server.url}/v1/padlm/presets").json()["persrm"] == "my-persrm"
        assert answer.json()["padlm"]["persrm"] == "my-persrm"
        assert server.model == "tiny-model"
    assert all(str(tmp_path) not in text for text in texts)


# ---- graceful shutdown ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny_lm, tmp_path_factory):
    """The tiny model with an 8k context, so that a request can outlast the drain on a fast
    machine (RoPE has no learned positions: the weights are the same)."""
    directory = tmp_path_factory.mktemp("models") / "tiny"
    tiny_lm.model.save_pretrained(directory)
    tiny_lm.tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def read_stream(response: httpx.Response, seen: list) -> None:
    for line in response.iter_lines():
        if line.startswith("data: "):
            seen.append(line[6:])


def test_sigterm_drains_then_ends_every_request_cleanly(tiny_dir):
    """SIGTERM with two open streams and one non-streaming request: new requests get a 503
    at once, the running rows keep decoding during the drain, then both streams end with an
    error event and ``[DONE]``, the other request gets a 503 body, and the process exits
    within the drain timeout (plus a little to close the connections). The key comes from
    ``PADLM_API_KEY``."""
    drain, port = 3.0, free_port()
    url, key = f"http://127.0.0.1:{port}", {"authorization": "Bearer k"}
    process = subprocess.Popen(
        [sys.executable, "-m", "padlm.server", "--model", str(tiny_dir), "--persrm",
         "identity", "--device", "cpu", "--port", str(port), "--drain-timeout", str(drain),
         "--log-level", "warning"],
        env={**os.environ, "PADLM_API_KEY": "k"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        def healthy() -> bool:
            assert process.poll() is None, process.stdout.read()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=240)
        assert chat(url, {"messages": HI, "max_tokens": 2}).status_code == 401
        body = {"messages": HI, "max_tokens": 4000, "ignore_eos": True}
        streams: list[list[str]] = [[], []]
        results: dict = {}
        with httpx.Client(timeout=120, headers=key) as client:
            opened = [client.stream("POST", f"{url}/v1/chat/completions",
                                    json={**body, "stream": True}) for _ in streams]
            readers = [threading.Thread(target=read_stream,
                                        args=(context.__enter__(), seen))
                       for context, seen in zip(opened, streams, strict=True)]
            for reader in readers:
                reader.start()
            plain = threading.Thread(target=lambda: results.update(
                plain=chat(url, body, key)))
            plain.start()
            wait_until(lambda: httpx.get(f"{url}/health").json()["live_rows"] == 3)
            wait_until(lambda: all(len(seen) > 2 for seen in streams))
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            at_signal = [len(seen) for seen in streams]
            refused = chat(url, {"messages": HI, "max_tokens": 2}, key)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert httpx.get(f"{url}/health").status_code == 503
            for thread in [*readers, plain]:
                thread.join(60)
        process.wait(drain + 30)
        exited = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for seen, before in zip(streams, at_signal, strict=True):
        assert seen[-1] == "[DONE]"
        assert json.loads(seen[-2])["error"]["code"] == "server_shutting_down"
        assert len(seen) > before + 2  # the rows kept decoding while draining
    assert results["plain"].status_code == 503
    assert results["plain"].json()["error"]["code"] == "server_shutting_down"
    assert process.returncode in (0, -signal.SIGTERM)
    assert drain - 0.5 <= exited <= drain + 3, exited


# ---- the playground with a key -------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_playground_asks_for_the_key_and_then_works(serve):
    from playwright.sync_api import expect, sync_playwright

    server, service = serve(api_keys=("sekret",))

    worker = service.worker
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            expect(page.locator("#meta")).to_contain_text("needs an API key")
            page.fill("#api-key", "sekret")
            page.locator("#api-key").dispatch_event("change")
            expect(page.locator("#presets .chip")).to_have_count(9)
            page.fill("#prompt", "Say hi.")
            page.fill("#max-tokens", "3")
            page.click("#generate")
            for pane in ("base", "personalized"):
                expect(page.locator(f"#{pane}-status")).to_have_attribute(
                    "data-state", "done", timeout=120_000)
        finally:
            browser.close()
    assert not errors, errors
    assert worker.stats["jobs_done"] == 2
