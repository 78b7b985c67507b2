"""Where the preference text goes in the model's context (a measured choice: see "Where the
preference goes" in reports/README.md).

``system``: the preference is the system message. ``user-prefix``: it precedes the
instruction in the user turn. ``bracket``: PAD's released template inside the user turn.
Everything is rendered with the tokenizer's own chat template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from padlm.errors import PadlmError

if TYPE_CHECKING:  # transformers-free at import: the CLI's configs check placements
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PLACEMENTS = ("system", "user-prefix", "bracket")
DEFAULT_PLACEMENT = "user-prefix"

PAD_TEMPLATE = (
    "[Guidelines] Your task is to generate response by considering the following principle. "
    "[Principles] {preference} [Instruction] {instruction}"
)

Message = dict[str, str]


def check_placement(placement: str) -> None:
    """The one refusal of an unknown placement (engines, training configs, rendering)."""
    if placement not in PLACEMENTS:
        raise PadlmError(f"unknown placement {placement!r}; choose one of "
                         f"{', '.join(PLACEMENTS)}", param="placement")


def place_preference(messages: Sequence[Message], preference: str, placement: str) -> list[Message]:
    """Return a copy of ``messages`` with ``preference`` put where ``placement`` says."""
    check_placement(placement)
    messages = [dict(m) for m in messages]
    if not preference:
        return messages
    if placement == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n{preference}"
            return messages
        return [{"role": "system", "content": preference}, *messages]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise PadlmError("the conversation has no user message to attach the preference to")
    instruction = messages[last_user]["content"]
    if placement == "user-prefix":
        messages[last_user]["content"] = f"{preference}\n\n{instruction}"
    else:
        messages[last_user]["content"] = PAD_TEMPLATE.format(
            preference=preference, instruction=instruction
        )
    return messages


def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PadlmError("the prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not prompt:
        raise PadlmError("the conversation has no messages")
    for message in prompt:
        if message.get("role") not in {"system", "user", "assistant"}:
            raise PadlmError(f"message role must be system, user or assistant: {message!r}")
        if not isinstance(message.get("content"), str):
            raise PadlmError("every message needs a text 'content'")
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise PadlmError("the conversation has no non-empty user message")
    return [dict(m) for m in prompt]


def render(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[Message],
    preference: str = "",
    placement: str = DEFAULT_PLACEMENT,
) -> list[int]:
    """Token ids of the chat-formatted context, ready for the assistant's reply."""
    messages = place_preference(as_messages(prompt), preference, placement)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text)["input_ids"]


def preference_token_ids(tokenizer: PreTrainedTokenizerBase, preference: str) -> tuple[int, ...]:
    """The token ids a response would use to quote the preference's words: each word as
    written, lower-cased and capitalised, with and without a leading space (the echo guard's
    list)."""
    words = set(re.findall(r"[A-Za-z0-9']+", preference))
    variants = {form for word in words for form in (word, word.lower(), word.capitalize())}
    ids: set[int] = set()
    for form in variants:
        for text in (form, f" {form}"):
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tuple(sorted(ids))
