"""``padlm serve``: an OpenAI-compatible server with per-request preferences.

Concurrent requests with different preferences and settings decode together in one
continuously refilled batch (:mod:`padlm.server.worker`); :mod:`padlm.server.app` is the HTTP
layer and the playground page; :mod:`padlm.bench.serve` measures it under load. Imports are
lazy so that ``padlm --help`` does not pay for FastAPI.
"""

from __future__ import annotations

__all__ = ["BatchWorker", "ServerSettings", "ServerThread", "create_app"]


def __getattr__(name: str):
    if name in ("ServerThread", "create_app"):
        from padlm.server import app

        return getattr(app, name)
    if name == "ServerSettings":
        from padlm.server.settings import ServerSettings

        return ServerSettings
    if name == "BatchWorker":
        from padlm.server.worker import BatchWorker

        return BatchWorker
    raise AttributeError(name)
