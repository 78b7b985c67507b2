"""A profile text from a user's past messages (Guided Profile Generation): a local model
reads what the user wrote and describes, in a few sentences addressed to an assistant, how
they want to be answered. The text becomes the profile's preference text, which ``pad``,
``prompt`` and ``linear-alignment`` read like any stated preference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from padlm.core.config import GenerationConfig
from padlm.errors import PadlmError

DEFAULT_HISTORY_MODEL = "qwen2.5-coder-1.5b-instruct"
MAX_HISTORY_CHARS = 6000  # the newest messages that fit: a small model's context, and focus
PROFILE_TOKENS = 96
INSTRUCTION = (
    "Here are messages one user wrote to an AI assistant:\n\n{messages}\n\n"
    "From how this user writes and what they ask, describe in two or three sentences how "
    "an assistant should answer them: how simple or expert, how short or detailed, and in "
    "what tone. Address the assistant directly, starting with \"Answer\". Write only the "
    "description.")


def read_messages(path: Path) -> list[str]:
    """A user's past messages: a JSON list of strings or of ``{role, content}`` messages,
    JSON lines of either, or plain text with one message per line; only the user's own
    turns count."""
    try:
        raw = path.read_text("utf-8")
    except OSError as error:
        raise PadlmError(f"cannot read --messages {path}: {error.strerror or error}",
                         param="messages") from None
    try:
        items = json.loads(raw)
        items = items if isinstance(items, list) else [items]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError:
            items = [line for line in raw.splitlines() if line.strip()]
    messages = []
    for item in items:
        if isinstance(item, str):
            messages.append(item)
        elif isinstance(item, dict) and isinstance(item.get("content"), str):
            if item.get("role", "user") == "user":
                messages.append(item["content"])
        else:
            raise PadlmError(f"{path}: each message must be a string or an object with a "
                             f"string 'content', got {str(item)[:60]!r}", param="messages")
    messages = [m.strip() for m in messages if m.strip()]
    if not messages:
        raise PadlmError(f"{path} holds no user messages", param="messages")
    return messages


def history_prompt(messages: Sequence[str], max_chars: int = MAX_HISTORY_CHARS) -> str:
    """The instruction with the newest messages that fit in ``max_chars``, oldest first."""
    kept, size = [], 0
    for message in reversed(messages):
        if size + len(message) > max_chars and kept:
            break
        kept.append(message[:max_chars])
        size += len(message)
    listed = "\n".join(f"- {message}" for message in reversed(kept))
    return INSTRUCTION.format(messages=listed)


def profile_text(engine, messages: Sequence[str], max_new_tokens: int = PROFILE_TOKENS
                 ) -> str:
    """The model's description of the user (greedy, the base model with no preference:
    the description must come from the messages, not from a preference padlm adds)."""
    generation = engine.generate([history_prompt(messages)], None, "base",
                                 GenerationConfig(max_new_tokens=max_new_tokens))[0]
    text = " ".join(generation.text.split())
    if not text:
        raise PadlmError("the model wrote an empty profile from these messages; try a "
                         "larger --model", param="model")
    return text
