"""``padlm models``."""

from __future__ import annotations

import json

from rich.console import Console


def models() -> None:
    """List cached models, fetching and converting the default one if needed."""
    from padlm.core.models import cached_models, ensure_default_model

    path = ensure_default_model()
    Console(stderr=True).print(f"default model ready at {path}")
    for entry in cached_models():
        print(json.dumps(entry))
