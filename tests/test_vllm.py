"""PAD inside vLLM (padlm.vllm): greedy output equals the HF engine's, token for token.

The engine tests need vLLM's CPU build, which pins a transformers older than the project's,
so it lives in its own environment: ``make setup-vllm``, then
``.venv-vllm/bin/python -m pytest tests/test_vllm.py``. In the main environment they skip;
the request parsing and refusals, which import no vLLM, run everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from padlm.core.config import GenerationConfig
from padlm.core.decoding import Request
from padlm.core.engine import Personalizer
from padlm.core.guides import default_persrm_dir
from padlm.core.preferences import parse_preference
from padlm.errors import PadlmError
from padlm.vllm.requests import PadArgs, pad_args, padlm_architecture

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed here: make setup-vllm, then "
    ".venv-vllm/bin/python -m pytest tests/test_vllm.py")

PROMPTS = ("Explain how a rainbow forms.", "Why do cats purr?")
TOKENS = 24
# on a GPU (scripts/gpu-check.sh) each engine of a test takes a share of the memory, so the
# HF engine and a second vLLM engine fit beside it; vLLM's CPU build sizes its KV cache from
# VLLM_CPU_KVCACHE_SPACE instead
GPU_SHARE = {"gpu_memory_utilization": 0.25} if torch.cuda.is_available() else {}


def test_pad_args_nested_and_flat_forms() -> None:
    assert pad_args(None) is None and pad_args({"other": 1}) is None
    assert pad_args({"padlm": {"weight": 0.5, "top_k": 4}}) == PadArgs(0.5, 4)
    # vllm_xargs over HTTP holds flat scalars only
    assert pad_args({"padlm_weight": 2, "padlm_echo_guard": 1, "padlm_preference": "be brief"}
                    ) == PadArgs(2, None, True, "be brief")


@pytest.mark.parametrize(("extra", "param"), [
    ({"padlm": {"weight": float("nan")}}, "weight"),
    ({"padlm_top_k": 0}, "top_k"),
    ({"padlm": {"wieght": 1.0}}, "padlm"),
    ({"padlm": 1.0}, "padlm"),
    ({"padlm_echo_guard": True}, "preference"),
])
def test_pad_args_refusals_name_the_field(extra, param) -> None:
    with pytest.raises(PadlmError) as error:
        pad_args(extra)
    assert error.value.param == param


def test_architectures() -> None:
    assert padlm_architecture(["LlamaForCausalLM"]) == "PadlmLlamaForCausalLM"
    assert padlm_architecture(["Qwen2ForCausalLM"]) == "PadlmQwen2ForCausalLM"
    with pytest.raises(PadlmError, match="vllm engine"):
        padlm_architecture(["GPT2LMHeadModel"])


def test_unconditioned_persrm_refused_for_pad_only() -> None:
    """The shipped default PersRM measures its reward without the preference: pad is refused
    on this engine (naming both), base and prompt still run; ``default`` on this engine picks
    the shipped one-lane PersRM instead."""
    from padlm.vllm.engine import choose_persrm

    choice = choose_persrm(str(default_persrm_dir()), "SmolLM2-135M-Instruct")
    assert not choice.runnable
    assert "pad cannot run on the vllm engine" in str(choice.refusal)
    assert "unconditioned" in str(choice.refusal)
    default = choose_persrm("default", "SmolLM2-135M-Instruct")
    assert default.runnable and default.path == str(default_persrm_dir("conditioned"))
    assert default.config.reference == "conditioned"
    # another model's PersRM or a guide model: a separate guide, which this engine refuses
    # for pad alone, naming both models (base and prompt still run)
    other = choose_persrm("conditioned", "Qwen2.5-Coder-1.5B-Instruct")
    assert not other.runnable
    assert "trained on SmolLM2-135M-Instruct, not Qwen2.5-Coder-1.5B-Instruct" in str(
        other.refusal)
    guide = choose_persrm("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct")
    assert not guide.runnable and "separate guide" in str(guide.refusal)
    assert "--engine hf" in str(guide.refusal)
    fallback = choose_persrm("default", "Qwen2.5-Coder-1.5B-Instruct")
    assert not fallback.runnable and "SmolLM2-135M-Instruct" in str(fallback.refusal)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_engine_says_how_to_get_it() -> None:
    from padlm.vllm.engine import VllmPersonalizer

    engine = VllmPersonalizer("default", persrm="identity")
    with pytest.raises(PadlmError, match="make setup-vllm"):
        engine.generate(["hi"], None, "base")


def test_replicas_split_the_cores_and_the_kv_cache(monkeypatch) -> None:
    from padlm.bench.vllm_dp import replica_binding, replica_environment

    assert replica_binding(1, [0, 1]) == "0-1"
    assert replica_binding(2, [1, 0]) == "0|1"
    assert replica_binding(2, [0, 1, 2, 3, 4]) == "0-1|2-3"  # equal shares; the rest idle
    with pytest.raises(PadlmError, match="3 replicas need as many CPU cores"):
        replica_binding(3, [0, 1])
    assert replica_environment(2, on_cpu=False) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = replica_environment(2, on_cpu=True)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env  # the user's binding stands
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # one engine's binding
    with pytest.raises(PadlmError, match="binds 1 engine.s. but 2 replicas need"):
        replica_environment(2, on_cpu=True)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert replica_environment(1, on_cpu=True)["VLLM_CPU_OMP_THREADS_BIND"] == \
        replica_binding(1, sorted(os.sched_getaffinity(0)))


def test_replicas_table() -> None:
    from padlm.bench.vllm_dp import replicas_table

    level = {"requests": 4, "errors": 0, "p50_latency_s": 1.0, "p95_latency_s": 2.0,
             "startup_seconds": 60.0}
    table = replicas_table({"same_tokens": True, "levels": [
        {**level, "replicas": 1, "tokens_per_second": 10.0, "vs_first": 1.0},
        {**level, "replicas": 2, "tokens_per_second": 19.0, "vs_first": 1.9}]})
    assert "| 2 | 4 | 0 | 19.0 | 1.9x | 1.0 | 2.0 | 60.0 |" in table
    assert table.endswith("same tokens at every replica count: True")


def test_vllm_args_prints_the_server_flags_shell_quoted(conditioned_persrm) -> None:
    import shlex

    from typer.testing import CliRunner

    from padlm.cli import app
    from padlm.vllm.engine import VllmPersonalizer

    result = CliRunner().invoke(app, ["vllm-args", "--persrm", conditioned_persrm,
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    flags = shlex.split(result.stdout)
    assert flags == VllmPersonalizer("default", persrm=conditioned_persrm,
                                     dtype="float32").server_args()
    assert "padlm.vllm.processor:PadLogitsProcessor" in flags
    refused = CliRunner().invoke(app, ["vllm-args", "--persrm", "identity"])
    assert isinstance(refused.exception, PadlmError)
    assert "needs a PersRM directory" in str(refused.exception)


def test_importing_padlm_vllm_imports_no_vllm() -> None:
    code = ("import sys, padlm, padlm.vllm, padlm.vllm.requests, padlm.vllm.engine; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the engine, on vLLM's CPU build -----------------------------------------------------


@pytest.fixture(scope="module")
def conditioned_persrm() -> str:
    """The shipped one-lane PersRM: a real, trained, non-identity head that vLLM runs on the
    shared backbone."""
    return str(default_persrm_dir("conditioned"))


@pytest.fixture(scope="module")
def hf_engine(default_lm, conditioned_persrm) -> Personalizer:
    return Personalizer(default_lm, persrm=conditioned_persrm)


@pytest.fixture(scope="module")
def vllm_engine(conditioned_persrm):
    from padlm.vllm.engine import VllmPersonalizer

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # beside the HF engine
    return VllmPersonalizer("default", persrm=conditioned_persrm, dtype="float32",
                            max_model_len=1024, seed=0, **GPU_SHARE)


def _hf_tokens(engine: Personalizer, requests: list[Request], strategies: list[str]
               ) -> list[list[int]]:
    """Each strategy's requests as one HF decode batch; tokens in the requests' order."""
    out: dict[int, list[int]] = {}
    for name in dict.fromkeys(strategies):
        chosen = [i for i, s in enumerate(strategies) if s == name]
        rows = engine.batch(name).run([requests[i] for i in chosen])
        out.update({i: row.tokens for i, row in zip(chosen, rows, strict=True)})
    return [out[i] for i in range(len(requests))]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["base", "prompt", "pad"])
def test_batch_one_equals_hf_engine(vllm_engine, hf_engine, strategy) -> None:
    config = GenerationConfig(max_new_tokens=TOKENS)
    for prompt in PROMPTS:
        [ours] = vllm_engine.generate([prompt], "P1A", strategy, config)
        [theirs] = hf_engine.generate([prompt], "P1A", strategy, config, batch_size=1)
        assert ours.tokens == theirs.tokens, (strategy, prompt)
        assert ours.text == theirs.text


@needs_vllm
@pytest.mark.slow
def test_stream_equals_hf_engine_stream(vllm_engine, hf_engine) -> None:
    """``padlm generate --stream --engine vllm``: the same tokens and deltas as the HF
    engine's stream (a stop string included, which padlm applies itself)."""
    config = GenerationConfig(max_new_tokens=TOKENS, stop=(",",))
    ours = [(e.token, e.delta) for e in vllm_engine.stream(PROMPTS[0], "P1A", "pad", config)]
    theirs = [(e.token, e.delta) for e in hf_engine.stream(PROMPTS[0], "P1A", "pad", config)]
    assert ours == theirs and "".join(delta for _, delta in ours)


@needs_vllm
@pytest.mark.slow
def test_mixed_batch_equals_hf_engine(vllm_engine, hf_engine) -> None:
    """One vLLM batch holding every strategy, different preferences, weights, top-k and the
    echo guard; PAD must also change something (a no-op processor would pass the rest)."""
    rows = [
        ("base", PROMPTS[0], "P1A", {}),
        ("prompt", PROMPTS[1], "P2A", {}),
        ("pad", PROMPTS[0], "P1A", {"weight": 1.0}),
        ("pad", PROMPTS[1], "P3A", {"weight": 3.0, "top_k": 5}),
        ("pad", PROMPTS[0], "P1B", {"weight": 2.0, "echo_guard": True}),
        ("prompt", PROMPTS[0], "P1B", {}),
        ("pad", PROMPTS[1], "P2A", {"weight": 0.5}),
    ]
    requests = [Request(prompt, parse_preference(pref),
                        GenerationConfig(max_new_tokens=TOKENS, **settings))
                for _, prompt, pref, settings in rows]
    strategies = [row[0] for row in rows]
    ours = [g.tokens for g in vllm_engine.generate_requests(requests, strategies)]
    assert ours == _hf_tokens(hf_engine, requests, strategies)
    assert ours[4] != ours[5], "PAD at weight 2 left the prompted output unchanged"


@needs_vllm
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="tensor parallelism needs two GPUs (scripts/gpu-check.sh)")
def test_tensor_parallel_pad_equals_hf_engine(conditioned_persrm, hf_engine) -> None:
    """Two-way tensor parallelism shards the lm_head: PAD's candidate rows are summed across
    the shards, and the output equals the HF engine's."""
    from padlm.vllm.engine import VllmPersonalizer

    engine = VllmPersonalizer("default", persrm=conditioned_persrm, dtype="float32",
                              max_model_len=1024, seed=0, tensor_parallel_size=2, **GPU_SHARE)
    requests = [Request(prompt, parse_preference(preference),
                        GenerationConfig(max_new_tokens=TOKENS, weight=weight))
                for prompt, preference, weight in ((PROMPTS[0], "P1A", 1.0),
                                                   (PROMPTS[1], "P3B", 2.0))]
    ours = [g.tokens for g in engine.generate_requests(requests, ["pad", "pad"])]
    assert ours == _hf_tokens(hf_engine, requests, ["pad", "pad"])


@needs_vllm
@pytest.mark.slow
def test_repetition_control_equals_hf_engine(vllm_engine, hf_engine) -> None:
    """padlm's response-only repetition penalty and no-repeat-ngram ban, applied before PAD's
    candidates, in a mixed batch; each must change the greedy output (or the test could pass
    on a processor that does nothing)."""
    rows = [
        ("base", PROMPTS[0], {"no_repeat_ngram_size": 2}),
        ("prompt", PROMPTS[1], {"repetition_penalty": 1.5}),
        ("pad", PROMPTS[0], {"weight": 1.0, "no_repeat_ngram_size": 2,
                             "repetition_penalty": 1.3}),
        ("base", PROMPTS[0], {}),
        ("prompt", PROMPTS[1], {}),
        ("pad", PROMPTS[0], {"weight": 1.0}),
    ]
    requests = [Request(prompt, parse_preference("P1A"),
                        GenerationConfig(max_new_tokens=48, **settings))
                for _, prompt, settings in rows]
    strategies = [row[0] for row in rows]
    ours = [g.tokens for g in vllm_engine.generate_requests(requests, strategies)]
    assert ours == _hf_tokens(hf_engine, requests, strategies)
    assert all(ours[i] != ours[i + 3] for i in range(3)), "repetition control changed nothing"


@needs_vllm
@pytest.mark.slow
def test_vllm_sampler_rows_depend_on_their_seed_only(vllm_engine) -> None:
    """A teacher response is a function of its own seed, not of the chunk it was sampled in
    (what makes a resumed build reproducible)."""
    from padlm.data.samplers import SampleRequest, SamplingSettings, VllmSampler

    sampler = VllmSampler(vllm_engine)
    requests = [SampleRequest([{"role": "user", "content": prompt}], "Be brief.", seed, 0.9)
                for seed, prompt in enumerate((*PROMPTS, "Name three rivers."))]
    settings = SamplingSettings(max_new_tokens=16)
    together = sampler.sample(requests, settings)
    alone = sampler.sample(requests[2:], settings)
    assert together[2] == alone[0]
    assert together[0].text != sampler.sample([dataclasses.replace(
        requests[0], seed=99)], settings)[0].text


@needs_vllm
@pytest.mark.slow
def test_data_build_on_the_vllm_engine(tmp_path) -> None:
    """``padlm data build --engine vllm`` end to end on the default model: rows name their
    sampler, the build record names the engine, and a rerun resumes without sampling."""
    import json

    out = tmp_path / "pairs.jsonl"
    args = [sys.executable, "-m", "padlm", "data", "build", "--out", str(out), "--engine",
            "vllm", "--axes", "P2", "--limit", "2", "--batch-size", "4", "--max-new-tokens",
            "24", "--mode", "sample"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    generated = [row for row in rows if row["dimension"] in ("P2A", "P2B")]
    assert generated and all(row["meta"]["sampler"] == "SmolLM2-135M-Instruct"
                             for row in generated)
    [run] = json.loads((tmp_path / "pairs.build.json").read_text())["runs"]
    assert run["engine"] == "vllm" and run["generated_tokens"] > 0
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0 and out.read_text().count("\n") == len(rows)


def test_refusals_come_before_the_engine_starts(conditioned_persrm) -> None:
    """What this engine cannot run (or would run with another meaning) is refused naming the
    strategy and the engine, without starting vLLM (which takes a minute)."""
    from padlm.vllm.engine import VllmPersonalizer

    engine = VllmPersonalizer("default", persrm=conditioned_persrm)
    engine.check("pad", GenerationConfig())
    for strategy, config in [("linear-alignment", GenerationConfig()),
                             ("best-of-n", GenerationConfig())]:
        with pytest.raises(PadlmError, match=f"{strategy} cannot run on the vllm engine"):
            engine.check(strategy, config)
    assert "llm" not in vars(engine)  # nothing started


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_vllm_openai_server_runs_pad(conditioned_persrm, hf_engine, replicas,
                                     monkeypatch) -> None:
    """vLLM's own OpenAI server with the plugin's flags, alone and with two data-parallel
    engine replicas (each on its own core here): PAD through ``vllm_xargs`` equals the HF
    engine for rows of different preferences and weights, and a bad setting is an HTTP 400
    (refused at admission, engine alive)."""
    import asyncio

    import httpx

    from padlm.bench.serve import free_port, running_server
    from padlm.bench.vllm_dp import (
        completion_body,
        pad_requests,
        replica_environment,
        run_completions,
        server_command,
    )
    from padlm.vllm.engine import VllmPersonalizer

    engine = VllmPersonalizer("default", persrm=conditioned_persrm, dtype="float32",
                              max_model_len=1024)
    port = free_port()
    # the in-process engine of the other tests bound its OpenMP threads for one engine
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = {**replica_environment(replicas, on_cpu=True), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with running_server(server_command(engine, replicas, port), f"http://127.0.0.1:{port}",
                        env) as url:
        requests = pad_requests(4, TOKENS)  # two preferences, two weights
        bodies = [completion_body(engine, request) for request in requests]
        summary, outputs = asyncio.run(run_completions(url, bodies, clients=4))
        assert summary["errors"] == 0, summary["first_error"]
        assert outputs == _hf_tokens(hf_engine, requests, ["pad"] * 4)
        bad = httpx.post(f"{url}/v1/completions", timeout=60,
                         json={**bodies[0], "vllm_xargs": {"padlm_top_k": 0}})
        assert bad.status_code == 400 and "top-k must be >= 1" in bad.text, bad.text
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


@needs_vllm
@pytest.mark.slow
def test_padlm_server_on_the_vllm_engine(vllm_engine, hf_engine) -> None:
    """``padlm serve --engine vllm``: padlm's own API on vLLM, driven with the official
    client. Concurrent requests of different strategies (streamed or not, with a stop
    string and repetition control) get the HF engine's text, and what this engine cannot run
    is a 400 naming it, with the server still serving."""
    import concurrent.futures

    import httpx
    import openai

    from padlm.server.app import ServerThread, create_app

    cases = [
        ("pad", "P1A", {"pad": {"weight": 1.0}}, False),
        ("prompt", "P2A", {}, True),
        ("pad", "P3A", {"pad": {"weight": 2.0, "top_k": 5}, "no_repeat_ngram_size": 2}, True),
        ("base", "P1B", {"stop": ["."]}, False),
    ]

    def expected(strategy, preference, extra) -> str:
        settings = {"weight": extra.get("pad", {}).get("weight"),
                    "top_k": extra.get("pad", {}).get("top_k"),
                    "no_repeat_ngram_size": extra.get("no_repeat_ngram_size", 0),
                    "stop": tuple(extra.get("stop", ()))}
        request = Request([{"role": "user", "content": PROMPTS[0]}],
                          parse_preference(preference),
                          GenerationConfig(max_new_tokens=TOKENS, **settings))
        return hf_engine.batch(strategy).run([request])[0].text

    with ServerThread(create_app(vllm_engine, max_batch_size=8)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=300)

        def ask(strategy, preference, extra, stream) -> str:
            body = {"preference": preference, "strategy": strategy,
                    **{k: v for k, v in extra.items() if k != "stop"}}
            kwargs = {"model": "SmolLM2-135M-Instruct", "max_tokens": TOKENS,
                      "temperature": 0, "stop": extra.get("stop"), "extra_body": body,
                      "messages": [{"role": "user", "content": PROMPTS[0]}]}
            if not stream:
                return client.chat.completions.create(**kwargs).choices[0].message.content
            chunks = client.chat.completions.create(stream=True, **kwargs)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: ask(*case), cases))
        for case, answer in zip(cases, answers, strict=True):
            assert answer == expected(*case[:3]), case
        with pytest.raises(openai.BadRequestError, match="linear-alignment cannot run on the "
                                                         "vllm engine"):
            ask("linear-alignment", "P1A", {}, False)
        with pytest.raises(openai.BadRequestError, match="token_rewards"):
            client.chat.completions.create(
                model="SmolLM2-135M-Instruct", max_tokens=4,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"strategy": "pad", "preference": "P1A", "token_rewards": True})
        presets = httpx.get(f"{server.url}/v1/padlm/presets", timeout=30).json()
        assert presets["engine"] == "vllm" and "pad" in presets["strategies"]
        assert ask(*cases[1]) == answers[1]  # still serving after the refusals


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc (the engine core and its workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _running(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (an exited one may linger as a zombie: not running)."""
    running = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
    return running


@needs_vllm
@pytest.mark.slow
def test_a_stopped_padlm_server_leaves_no_vllm_process_behind(monkeypatch) -> None:
    """SIGTERM to ``padlm serve --engine vllm`` ends vLLM's engine core and workers with it:
    left to interpreter exit they outlived the server, holding the model's memory."""
    import httpx

    from padlm.bench.serve import free_port

    port = free_port()
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "padlm", "serve", "--engine", "vllm", "--persrm", "identity",
         "--port", str(port)], env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        assert server.poll() is None, "the server exited before it answered"
        engine_processes = _descendants(server.pid)
        assert engine_processes  # vLLM runs its engine core in a child process
        server.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit status is the signal's
        assert server.wait(120) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _running(engine_processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        alive = _running(engine_processes)
        assert not alive, f"vLLM processes {sorted(alive)} outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
