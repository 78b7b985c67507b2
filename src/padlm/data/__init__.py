"""Offline preference data for training PersRMs.

One row = TRL's explicit-prompt preference format plus the preference text:
``{"prompt", "preference", "chosen", "rejected", "dimension", "source"}`` (and an optional
``meta`` object). ``schema`` validates rows, ``pools`` reads the prompt pools shipped in
``data/``, ``hh`` converts HH-RLHF dialogues, ``build`` makes contrastive pairs with the base
model, ``splits`` holds out prompts.
"""

from padlm.data.schema import PreferenceRow, load_rows, validate_row
from padlm.data.splits import is_validation, split_rows

__all__ = ["PreferenceRow", "is_validation", "load_rows", "split_rows", "validate_row"]
