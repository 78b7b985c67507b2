"""The prompt pools ``padlm data build`` draws from (copied into ``data/`` with provenance).

Self-Instruct seed and user-oriented instructions (the instruction plus its first input, when
it has one) and the first human turns of HH-RLHF harmless-base. ``koala_eval_50`` is
evaluation-only and deliberately absent.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from padlm.data.splits import is_validation
from padlm.errors import PadlmError

SELF_INSTRUCT_FILES = ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented.jsonl")
HH_FILE = "hh_rlhf_harmless_base_test.jsonl.gz"


@dataclass(frozen=True)
class PoolPrompt:
    id: str
    prompt: str
    source: str


POOL_FILES = (*SELF_INSTRUCT_FILES, HH_FILE)


def default_pool_dir() -> Path:
    """``$PADLM_DATA_DIR``, else ``data/`` in the working directory (a checkout's root).

    The pools are not packaged (they are data with their own licences, shipped beside the
    code in ``data/``), so a default must be a place the user chose or is standing in; an
    installed package has no repository to find by walking up from its own file.
    """
    directory = Path(os.environ.get("PADLM_DATA_DIR") or Path.cwd() / "data")
    missing = [name for name in POOL_FILES if not (directory / name).exists()]
    if missing:
        raise PadlmError(f"no prompt pools in {directory} (missing {', '.join(missing)}): pass "
                         "--pool-dir DIR or set PADLM_DATA_DIR to a directory holding the "
                         "files of the repository's data/")
    return directory


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.exists():
        raise PadlmError(f"prompt pool {path} not found (pass --pool-dir or set "
                         f"PADLM_DATA_DIR to a directory holding the files in data/)")
    return path


def self_instruct_prompts(directory: Path) -> list[PoolPrompt]:
    prompts = []
    for name in SELF_INSTRUCT_FILES:
        source = "self-instruct-" + ("seed" if "seed" in name else "user-oriented")
        for line in _require(directory, name).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            task = json.loads(line)
            text = task["instruction"].strip()
            instances = task.get("instances") or []
            first_input = (instances[0].get("input") or "").strip() if instances else ""
            if first_input:
                text = f"{text}\n\n{first_input}"
            prompts.append(PoolPrompt(f"{source}:{task['id']}", text, source))
    return prompts


def parse_dialogue(text: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` into chat messages (user / assistant)."""
    messages: list[dict[str, str]] = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        human, _, rest = chunk.partition("\n\nAssistant:")
        messages.append({"role": "user", "content": human.strip()})
        for j, part in enumerate(("\n\nAssistant:" + rest).split("\n\nAssistant:")[1:]):
            if j == 0 or part.strip():
                messages.append({"role": "assistant", "content": part.strip()})
    return messages


def hh_records(directory: Path) -> list[dict[str, str]]:
    with gzip.open(_require(directory, HH_FILE), "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def hh_first_turn_prompts(directory: Path) -> list[PoolPrompt]:
    """The first human turn of each harmless-base dialogue (deduplicated)."""
    seen: set[str] = set()
    prompts = []
    for record in hh_records(directory):
        messages = parse_dialogue(record["chosen"])
        if not messages or not messages[0]["content"]:
            continue
        text = messages[0]["content"]
        if text in seen:
            continue
        seen.add(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        prompts.append(PoolPrompt(f"hh-harmless-first-turn:{digest}", text,
                                  "hh-harmless-first-turn"))
    return prompts


def held_out_self_instruct(directory: Path, max_chars: int = 400) -> list[PoolPrompt]:
    """Self-Instruct prompts of the validation split under ``max_chars``, by id: the
    generation-behaviour evaluation takes the first N (no PersRM ever trained on them)."""
    pool = sorted(self_instruct_prompts(directory), key=lambda p: p.id)
    return [p for p in pool if is_validation(p.prompt) and len(p.prompt) < max_chars]
