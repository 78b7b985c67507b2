"""``padlm strategies``."""

from __future__ import annotations

import json
from dataclasses import asdict


def strategies() -> None:
    """List every decoding strategy and what it needs."""
    from padlm.core.registry import load_registry

    for cls in load_registry().values():
        print(json.dumps(asdict(cls.spec)))
