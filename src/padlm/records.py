"""The ground floor for files: prompt files, JSONL records read and appended crash-safely.

Everything that reads prompts or keeps a resumable JSONL log (the harness, the data build, the
LLM judge's cache, the scripts) uses these, so a torn last line means the same everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from padlm.errors import PadlmError

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict]:
    """All complete records; a torn last line (the run was killed mid-write) is dropped."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                log.warning("%s:%d: dropping an incomplete last line", path, number)
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable line", path, number)
    return records


class JsonlAppender:
    """Append one JSON line at a time, flushed and fsynced, after cutting any torn tail, so
    a resumed job never glues its first record onto half of the last one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with path.open("r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self.handle = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_prompts(path: Path) -> list[dict[str, str]]:
    """Read a prompts file: a JSON list (strings or objects with ``prompt``), JSONL with a
    ``prompt`` field, or plain text with one prompt per line. Returns ``{id, prompt}``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise PadlmError(f"cannot read prompts file {path}: {error}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise PadlmError(f"prompts file {path} is not valid JSON: {error}") from None
    elif stripped.startswith("{"):
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PadlmError(f"{path}:{number}: invalid JSON line: {error}") from None
    else:
        items = [line for line in text.splitlines() if line.strip()]
    prompts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not str(item.get("prompt", "")).strip():
            raise PadlmError(f"{path}: entry {index + 1} has no non-empty 'prompt'")
        prompts.append({"id": str(item.get("id", index)), "prompt": str(item["prompt"])})
    if not prompts:
        raise PadlmError(f"prompts file {path} contains no prompts")
    return prompts
