"""HH-RLHF harmless-base as ``harmless`` preference rows (real human labels, no generation).

Prompt = the dialogue before the last assistant turn; chosen / rejected = the two last
assistant turns. Pairs whose dialogues differ before the last turn, or whose replies are
identical or empty, are dropped.
"""

from __future__ import annotations

from pathlib import Path

from padlm.core.preferences import PAD_DIMENSIONS
from padlm.data.pools import hh_records, parse_dialogue
from padlm.data.schema import PreferenceRow


def convert_pair(record: dict[str, str]) -> PreferenceRow | None:
    """One HH-RLHF record as a row, or None when it is not a clean last-turn pair."""
    chosen, rejected = parse_dialogue(record["chosen"]), parse_dialogue(record["rejected"])
    if len(chosen) < 2 or len(chosen) != len(rejected):
        return None
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None
    if chosen[:-1] != rejected[:-1]:
        return None
    good, bad = chosen[-1]["content"], rejected[-1]["content"]
    if not good or not bad or good == bad:
        return None
    return PreferenceRow(prompt=chosen[:-1], preference=PAD_DIMENSIONS["harmless"],
                         chosen=good, rejected=bad, dimension="harmless",
                         source="hh-rlhf-harmless-base")


def harmless_rows(directory: Path, max_chars: int | None = None) -> list[PreferenceRow]:
    """Every clean pair (2,303 of the 2,312 records), or those whose dialogue fits in
    ``max_chars`` (to keep sequences CPU-sized)."""
    rows = []
    for record in hh_records(directory):
        row = convert_pair(record)
        if row is None:
            continue
        size = sum(len(m["content"]) for m in row.prompt) + len(row.chosen) + len(row.rejected)
        if max_chars is None or size <= max_chars:
            rows.append(row)
    return rows
