"""The one exception type users see: its message is meant to be printed as-is."""

from __future__ import annotations


class PadlmError(ValueError):
    """Bad input or an unusable resource; the CLI prints it on one line and exits 2.

    ``param`` names the setting the error is about (``temperature``, ``top_k``, ...), so the
    server fills the OpenAI error's ``param`` without parsing the message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
