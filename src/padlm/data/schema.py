"""The preference-row format, its validation, and a loader that names bad lines.

A row's ``prompt`` is a string (one user turn) or a list of chat messages (a dialogue, as
HH-RLHF gives); ``chosen`` / ``rejected`` are assistant replies as plain strings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from padlm.errors import PadlmError

log = logging.getLogger(__name__)

FIELDS = ("prompt", "preference", "chosen", "rejected", "dimension", "source")
ROLES = {"system", "user", "assistant"}


@dataclass
class PreferenceRow:
    """``(prompt, preference): chosen > rejected``; ``dimension`` names the preference axis."""

    prompt: str | list[dict[str, str]]
    preference: str
    chosen: str
    rejected: str
    dimension: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["meta"]:
            del data["meta"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @property
    def prompt_key(self) -> str:
        """The text splits are keyed on (a dialogue's turns joined)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)


def validate_row(obj: Any) -> list[str]:
    """Every problem with one decoded JSON value (empty list = a valid row)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"missing field {name!r}" for name in FIELDS if name not in obj]
    for name in ("preference", "chosen", "rejected", "dimension", "source"):
        if name in obj and not isinstance(obj[name], str):
            problems.append(f"{name!r} must be a string")
    for name in ("chosen", "rejected", "dimension"):
        if isinstance(obj.get(name), str) and not obj[name].strip():
            problems.append(f"{name!r} is empty")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            problems.append("'prompt' is empty")
    elif isinstance(prompt, list):
        if not prompt or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in prompt
        ):
            problems.append("'prompt' messages need a role (system/user/assistant) and content")
        elif not any(m["role"] == "user" for m in prompt):
            problems.append("'prompt' has no user message")
    elif "prompt" in obj:
        problems.append("'prompt' must be a string or a list of messages")
    if (isinstance(obj.get("chosen"), str) and obj.get("chosen") == obj.get("rejected")
            and obj["chosen"]):
        problems.append("'chosen' and 'rejected' are identical")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        problems.append("'meta' must be an object")
    return problems


def parse_row(obj: dict[str, Any]) -> PreferenceRow:
    return PreferenceRow(**{name: obj[name] for name in FIELDS}, meta=dict(obj.get("meta", {})))


def load_rows(path: str | Path, strict: bool = False) -> tuple[list[PreferenceRow],
                                                                list[tuple[int, str]]]:
    """Read a JSONL file; return the valid rows and ``(line number, problem)`` for bad ones.

    Bad rows are skipped with a warning naming their line; ``strict`` makes the first report
    fatal (a :class:`PadlmError` listing every bad line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PadlmError(f"cannot read dataset {path}: {error}") from None
    rows: list[PreferenceRow] = []
    errors: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            errors.append((number, f"invalid JSON: {error.msg}"))
            continue
        problems = validate_row(obj)
        if problems:
            errors.append((number, "; ".join(problems)))
            continue
        rows.append(parse_row(obj))
    if errors:
        listing = "; ".join(f"{path}:{n}: {msg}" for n, msg in errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        if strict:
            raise PadlmError(f"{len(errors)} bad row(s): {listing}{more}")
        for number, message in errors[:20]:
            log.warning("%s:%d: skipped bad row: %s", path, number, message)
    if not rows:
        raise PadlmError(f"dataset {path} has no valid rows")
    return rows, errors
