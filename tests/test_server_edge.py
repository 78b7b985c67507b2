"""A hostile client against ``padlm serve`` (issue 30, findings 2, 4, 6 and 7, and the prompt
admission of finding 1): prompt-token and character caps, planning off the event loop,
float32-safe numbers and strict JSON, connection limits and timeouts, and the low findings.

Timeouts are configured small so the raw-socket cases take seconds; the one timing claim
(planning does not stall other streams) runs on the real default model and is asserted
against the same stream's own solo gaps.
"""

from __future__ import annotations

import json
import logging
import socket
import statistics
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from padlm import Personalizer
from padlm.errors import PadlmError
from padlm.server import app as app_module
from padlm.server import replies
from padlm.server.app import ServerThread, create_app
from padlm.server.settings import ServerSettings

HI = [{"role": "user", "content": "Hi"}]


def chat(url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN``/``Infinity``, as a browser's ``JSON.parse`` does."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def error_of(response: httpx.Response) -> dict:
    return strict_json(response.text)["error"]


def connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection((server.host, server.port))
    sock.settimeout(30)
    return sock


def head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"closed before a response: {data!r}"
        data += part
    top, body = data.split(b"\r\n\r\n", 1)
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, trickle: bytes = b"", every: float = 0.2,
                     within: float = 20.0) -> bool:
    """Whether the server closes the connection within ``within`` s while the client sends
    ``trickle`` a byte at a time every ``every`` s (nothing: an idle client)."""
    sock.settimeout(every)
    deadline = time.monotonic() + within
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionError:
            return True
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
            except ConnectionError:
                return True
            sent += 1
    return False


def metric_statuses(url: str, handler: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {sample.labels["status"]: sample.value for family in families
            for sample in family.samples if sample.name == "http_requests_total"
            and sample.labels["handler"] == handler}


# ---- A: prompt tokens ----------------------------------------------------------------------

def test_a_request_may_prefill_at_most_max_prompt_tokens_over_all_its_rows_and_lanes(serve):
    probe, _ = serve()
    p = chat(probe.url, {"messages": HI, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    server, service = serve(max_prompt_tokens=p)
    assert chat(server.url, {"messages": HI, "max_tokens": 1}).status_code == 200
    two_rows = chat(server.url, {"messages": HI, "max_tokens": 1, "n": 2})
    assert two_rows.status_code == 400
    error = error_of(two_rows)
    assert (error["param"], error["code"]) == ("messages", "prompt_too_long")
    assert str(2 * p) in error["message"] and str(p) in error["message"]
    assert "--max-prompt-tokens" in error["message"]
    # pad prefills the prompt in two lanes (base and preference-conditioned)
    pad = chat(server.url, {"messages": HI, "max_tokens": 1, "preference": "P1A",
                            "strategy": "pad"})
    assert pad.status_code == 400 and error_of(pad)["code"] == "prompt_too_long"
    text = httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": ["Hi", "Hi"], "max_tokens": 1})
    assert text.status_code == 400 and error_of(text)["param"] == "prompt"
    assert service.worker.stats["jobs_done"] == 1  # nothing refused was decoded


def test_prompt_settings_are_validated_and_have_flags():
    with pytest.raises(PadlmError, match="prefill-chunk-tokens"):
        ServerSettings(prefill_chunk_tokens=8)
    with pytest.raises(PadlmError, match="max-prompt-tokens"):
        ServerSettings(max_prompt_tokens=0)
    import typer
    from typer.testing import CliRunner

    from padlm.cli.serve import serve as serve_command
    cli = typer.Typer()
    cli.command()(serve_command)
    help_text = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "200"}).output
    for flag in ("--max-prompt-tokens", "--prefill-chunk-tokens", "--max-prompt-chars",
                 "--max-top-k", "--max-connections", "--keep-alive-timeout",
                 "--header-timeout", "--body-timeout"):
        assert flag in help_text, flag


# ---- B: character caps, planning off the event loop ----------------------------------------

def test_character_caps_come_before_tokenizing(serve):
    server, service = serve(max_prompt_chars=1000, max_preference_chars=50, max_stop_chars=8)
    calls = []
    tokenizer = service.engine.contexts
    service.engine.contexts = lambda *args: calls.append(args) or tokenizer(*args)
    cases = [
        ({"messages": [{"role": "user", "content": "x" * 600}] * 2}, "messages",
         "prompt_too_long"),
        ({"messages": HI, "preference": "p" * 51, "strategy": "pad"}, "preference",
         "preference_too_long"),
        ({"messages": HI, "stop": ["ok", "s" * 9]}, "stop", None),
        ({"messages": HI, "stop": "s" * 9}, "stop", None),
    ]
    for extra, param, code in cases:
        refused = chat(server.url, {"max_tokens": 1, **extra})
        assert refused.status_code == 400, refused.text
        assert error_of(refused)["param"] == param
        if code:
            assert error_of(refused)["code"] == code
    assert calls == []  # refused before any tokenization
    prompts = httpx.post(f"{server.url}/v1/completions", timeout=60,
                         json={"prompt": ["y" * 600, "y" * 600], "max_tokens": 1})
    assert prompts.status_code == 400 and error_of(prompts)["param"] == "prompt"
    assert chat(server.url, {"messages": HI, "max_tokens": 1, "stop": "s" * 8}
                ).status_code == 200


def stream_gaps(url: str, body: dict, during=None) -> list[float]:
    """Arrival gaps between a stream's chunks; ``during()`` runs once the stream flows and
    the gaps are those until it returns."""
    arrivals: list[float] = []
    done_at: list[float] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            arrivals.append(time.perf_counter())
            if during is not None and len(arrivals) == 5:
                thread = threading.Thread(target=lambda: (during(), done_at.append(
                    time.perf_counter())))
                thread.start()
            if done_at:
                break
    if during is not None:
        thread.join(300)
        assert done_at, "the stream ended before the other client was done"
    times = [t for t in arrivals[4:] if not done_at or t <= done_at[0] + 1]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_planning_a_huge_request_does_not_stall_open_streams(default_lm):
    """A stream keeps receiving tokens while another client sends messages that take
    hundreds of milliseconds to tokenize (then refused: too many prompt tokens) and a 1 MB
    one (refused before tokenizing): its largest gap stays near its own solo gaps. Before,
    each was rendered and tokenized on the event loop, and the stream froze meanwhile."""
    app = create_app(Personalizer(default_lm, persrm="identity"), max_batch_size=4)
    text = " ".join(f"item{i} is red." for i in range(80_000))
    big = {"messages": [{"role": "user", "content": text[:190_000]}], "max_tokens": 1}
    huge = {"messages": [{"role": "user", "content": text[:1_000_000]}], "max_tokens": 1}
    victim = {"messages": [{"role": "user", "content": "Tell me a long story."}],
              "max_tokens": 400, "ignore_eos": True, "stream": True}
    statuses: list[int] = []

    def attack() -> None:
        for body in (big, big, huge, big, big, huge):
            statuses.append(chat(server.url, body).status_code)

    with ServerThread(app) as server:
        solo = stream_gaps(server.url, {**victim, "max_tokens": 60})
        attacked = stream_gaps(server.url, victim, during=attack)
    assert statuses == [400] * 6
    typical = statistics.median(solo)
    print(f"solo gaps: median {typical * 1000:.1f} ms, max {max(solo) * 1000:.1f} ms; "
          f"under attack: max {max(attacked) * 1000:.1f} ms")
    assert max(attacked) < max(8 * typical, 2 * max(solo)), (typical, max(solo),
                                                              max(attacked))


# ---- C: float32 and strict JSON ------------------------------------------------------------

@pytest.mark.parametrize("weights", [[1e300, 1], [1e-50, 1e-50], [1, 1e-40]])
@pytest.mark.parametrize("strategy", ["mix", "soups"])
def test_mix_weights_that_float32_cannot_hold_are_400s(serve, weights, strategy):
    server, _ = serve()
    for stream in (False, True):
        refused = chat(server.url, {"messages": HI, "max_tokens": 2, "strategy": strategy,
                                    "preference": "P1A+P2B", "stream": stream,
                                    "mix": {"weights": weights}})
        assert refused.status_code == 400, refused.text
        assert error_of(refused)["param"] == "mix.weights"
    fine = chat(server.url, {"messages": HI, "max_tokens": 2, "strategy": strategy,
                             "preference": "P1A+P2B", "mix": {"weights": [3, 0]}})
    assert fine.status_code == 200


def test_a_value_that_is_not_finite_never_reaches_a_client(serve, monkeypatch):
    """Whatever non-finite number some future bug puts into a response: a non-streamed one
    is a JSON 500 (recorded as 500, not 0), a stream ends with a JSON error event and
    ``[DONE]``; every byte sent is valid JSON."""
    server, _ = serve()
    monkeypatch.setattr(replies, "_usage", lambda prompt, completion: {
        "prompt_tokens": prompt, "completion_tokens": float("nan"), "total_tokens": 0})
    plain = chat(server.url, {"messages": HI, "max_tokens": 2})
    assert plain.status_code == 500 and error_of(plain)["type"] == "server_error"
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": HI, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    events = [strict_json(payload) for payload in payloads[:-1]]
    assert events[-1]["error"]["type"] == "server_error"
    assert not any("usage" in event for event in events)
    assert metric_statuses(server.url, "/v1/chat/completions").get("500") == 1


# ---- D: connections ------------------------------------------------------------------------

def test_idle_connections_and_slow_headers_are_closed(serve):
    server, _ = serve(header_timeout_s=1.0, keep_alive_timeout_s=1.0)
    idle = connect(server)
    assert closed_by_server(idle)
    slow = connect(server)
    assert closed_by_server(slow, trickle=head(100) + b"{" * 100)
    served = connect(server)  # a keep-alive connection after a response: closed when idle
    body = json.dumps({"messages": HI, "max_tokens": 1}).encode()
    served.sendall(head(len(body)) + body)
    assert read_response(served)[0] == 200
    assert closed_by_server(served)
    assert chat(server.url, {"messages": HI, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("every", [0.1, 1.0])
def test_a_trickled_body_gets_a_408(serve, every):
    """0.1 s per byte: the body's total time runs out; 1 s per byte: each pause is too long."""
    server, _ = serve(body_timeout_s=1.5, body_chunk_timeout_s=0.5, header_timeout_s=30)
    sock = connect(server)
    sock.sendall(head(1000))
    status, headers, body = None, {}, b""
    for _ in range(60):
        try:
            sock.sendall(b"{")
        except ConnectionError:
            break
        time.sleep(every)
        sock.settimeout(0.01)
        try:
            peek = sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            continue
        finally:
            sock.settimeout(30)
        if peek:
            status, headers, body = read_response(sock)
            break
    assert status == 408, (status, body)
    assert headers["content-type"] == "application/json"
    assert strict_json(body)["error"]["code"] == "request_timeout"
    assert closed_by_server(sock)  # the rest of the body is never read


def test_connections_beyond_the_limit_get_503(serve):
    server, _ = serve(max_connections=2, header_timeout_s=30)
    held = [connect(server), connect(server)]
    assert chat(server.url, {"messages": HI, "max_tokens": 1}).status_code == 503
    for sock in held:
        sock.close()
    time.sleep(0.2)
    assert chat(server.url, {"messages": HI, "max_tokens": 1}).status_code == 200


def test_an_unfinished_upload_at_shutdown_gets_a_json_503(tiny_lm):
    app = create_app(Personalizer(tiny_lm, persrm="identity"), header_timeout_s=60,
                     body_timeout_s=60, body_chunk_timeout_s=60)
    server = ServerThread(app).__enter__()
    sock = connect(server)
    sock.sendall(head(1000) + b'{"messages": ')
    time.sleep(0.3)
    began = time.perf_counter()
    stopper = threading.Thread(target=server.__exit__)
    stopper.start()
    status, headers, body = read_response(sock)
    answered = time.perf_counter() - began
    stopper.join(60)
    assert status == 503 and headers["content-type"] == "application/json"
    assert strict_json(body)["error"]["code"] == "server_shutting_down"
    assert answered < app_module.SHUTDOWN_FLUSH_S  # not held until the tasks are cancelled


def test_a_client_that_leaves_during_its_upload_is_recorded_as_499(serve):
    server, _ = serve()
    sock = connect(server)
    sock.sendall(head(1000) + b'{"messages": ')
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 30
    while "499" not in (statuses := metric_statuses(server.url, "/v1/chat/completions")):
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
    assert "0" not in statuses and "500" not in statuses


# ---- E: the low findings -------------------------------------------------------------------

def test_pad_top_k_is_capped_by_the_server(serve):
    server, _ = serve(max_top_k=8)
    body = {"messages": HI, "max_tokens": 1, "preference": "P1A", "strategy": "pad"}
    refused = chat(server.url, {**body, "pad": {"top_k": 9}})
    assert refused.status_code == 400 and error_of(refused)["param"] == "pad.top_k"
    assert "8" in error_of(refused)["message"]
    assert chat(server.url, {**body, "pad": {"top_k": 8}}).status_code == 200
    assert ServerSettings().max_top_k == 64


@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 1e-40])
def test_a_top_p_that_float32_cannot_hold_is_a_400(serve, top_p):
    """1e-46 is positive in float64 and 0 in float32: no token passed the nucleus filter
    and the step failed (a 500)."""
    server, _ = serve()
    refused = chat(server.url, {"messages": HI, "max_tokens": 2, "temperature": 1.0,
                                "top_p": top_p})
    assert refused.status_code == 400 and error_of(refused)["param"] == "top_p"
    assert chat(server.url, {"messages": HI, "max_tokens": 2, "temperature": 1.0,
                             "top_p": 1e-30}).status_code == 200


def test_unknown_field_names_are_logged_escaped_and_bounded(serve, caplog):
    server, _ = serve()
    body = {"messages": HI, "max_tokens": 1, "x\nINFO padlm.access: forged": 1,
            **{f"key{i:05d}" + "k" * 100: i for i in range(500)}}
    with caplog.at_level("WARNING", logger="padlm.server.routes"):
        assert chat(server.url, body).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "unknown request field" in
             r.getMessage()]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "501" in lines[0]
    assert len(lines[0]) < 1000


def test_a_non_ascii_api_key_is_refused_at_startup():
    with pytest.raises(PadlmError, match="ASCII"):
        ServerSettings(api_keys=("clé-secrète",))
    with pytest.raises(PadlmError, match="ASCII"):
        ServerSettings(api_keys=("key\twith-tab",))
    assert ServerSettings(api_keys=("plain-key_1",)).api_keys == ("plain-key_1",)


def test_the_access_log_records_a_handler_error_as_500(serve, caplog):
    """The access log's status for a handler error is 500 (it used to say 0)."""
    server, _ = serve()
    with caplog.at_level(logging.INFO, logger="padlm.access"):
        original = replies._usage
        try:
            replies._usage = lambda *args: {"bad": float("inf")}
            assert chat(server.url, {"messages": HI, "max_tokens": 1}).status_code == 500
        finally:
            replies._usage = original
    statuses = [json.loads(r.getMessage())["status"] for r in caplog.records
                if r.name == "padlm.access"]
    assert statuses[-1] == 500
