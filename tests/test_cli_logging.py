"""Logs go to stderr on every engine: ``padlm generate --json`` writes JSON lines and nothing
else to stdout, so it can be piped into a file or ``jq``.

The vLLM test needs vLLM's CPU build, in its own environment (``make setup-vllm``, then
``.venv-vllm/bin/python -m pytest tests/test_cli_logging.py``, as ``make test`` does); in the
main environment it skips and the rest runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types

import pytest

PADLM = [sys.executable, "-c", "from padlm.cli import main; main()"]
PROMPTS = ("Explain how a rainbow forms.", "Why do cats purr?")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def generate_json(tmp_path, *engine: str) -> tuple[list[str], str]:
    """``padlm generate --prompts-file F --json`` as a user runs it: stdout's lines, stderr."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = subprocess.run(
        [*PADLM, "generate", "--prompts-file", str(prompts), "--json", "--strategy", "base",
         "--max-new-tokens", "4", *engine], capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines(), result.stderr


def assert_only_json(lines: list[str]) -> None:
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            not_json.append(line)
    assert not not_json, f"{len(not_json)} stdout lines are not JSON, e.g. {not_json[:3]}"
    assert len(lines) == len(PROMPTS)


@pytest.mark.slow
def test_generate_json_stdout_is_json_on_the_hf_engine(tmp_path) -> None:
    lines, _ = generate_json(tmp_path)
    assert_only_json(lines)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here: make setup-vllm, then "
                    ".venv-vllm/bin/python -m pytest tests/test_cli_logging.py")
def test_generate_json_stdout_is_json_on_the_vllm_engine(tmp_path) -> None:
    """vLLM's ~50 start-up log lines (its main process, engine core and worker) went to stdout
    among the JSON lines; they belong on stderr."""
    lines, stderr = generate_json(tmp_path, "--engine", "vllm")
    assert_only_json(lines)
    assert "EngineCore" in stderr  # vLLM still logs, from its engine process too: on stderr


def test_vllm_handlers_already_on_stdout_move_to_stderr(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Had vLLM been imported before padlm asks for it, its logger already holds a handler on
    stdout (the environment variable comes too late for it): that handler moves to stderr,
    and other handlers are left alone."""
    from padlm.vllm.engine import vllm_logs_to_stderr

    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    on_stdout, elsewhere = logging.StreamHandler(sys.stdout), logging.NullHandler()
    monkeypatch.setattr(logging.getLogger("vllm"), "handlers", [on_stdout, elsewhere])
    vllm_logs_to_stderr()
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"  # for vLLM's processes
    assert on_stdout.stream is sys.stderr


def test_a_stream_the_user_chose_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from padlm.vllm.engine import vllm_logs_to_stderr

    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stdout")
    vllm_logs_to_stderr()
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stdout"
