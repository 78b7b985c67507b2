"""The one exception type users see: its message is meant to be printed as-is."""


class PadlmError(ValueError):
    """Bad input or an unusable resource; the CLI prints it on one line and exits 2."""
