"""The server's limits and access rules, in one validated place read by the CLI and the app.

Every limit exists because a single request without it could take the server from everyone
else (issue 17): the batch and queue bounds, the per-request token cap and deadline, and the
body size. Access rules (API key, allowed ``Host`` names, CORS origins) stop other web pages
from driving a local server through a visitor's browser.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from padlm.errors import PadlmError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """What ``padlm serve`` enforces; ``create_app(engine, **fields)`` overrides any field."""

    max_batch_size: int = 16  # rows decoding together, at most
    max_queue: int = 64  # requests waiting for rows, at most
    # rows x max_tokens of the waiting requests, at most: admission by the size of the work,
    # not the number of requests (one n=16 request is 16 rows); default: 16 rows at the cap
    max_queue_tokens: int = 65536
    max_tokens_cap: int = 4096  # max_tokens of one choice, at most
    # prompt positions prefilled per decode step: a long prompt joins a chunk at a time
    # between the other rows' steps, so it delays them by about one chunk's forward per step
    prefill_chunk_tokens: int = 512
    max_n: int | None = None  # n and best_of, at most (None: max_batch_size)
    request_timeout_s: float = 600.0  # a request still decoding after this fails with a 504
    max_body_bytes: int = 1 << 20  # request bodies beyond this get a 413
    # on SIGTERM running rows may finish for this long; then every open request gets a 503
    # (25 s: inside the 30 s a container orchestrator waits before it kills the process)
    drain_timeout_s: float = 25.0
    # then every /v1 route needs "Authorization: Bearer <key>" (kept out of the repr/logs)
    api_key: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted; None: any
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    served_model_names: tuple[str, ...] = ()  # names the model answers to; (): its own name

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_cap", "max_body_bytes",
                     "prefill_chunk_tokens"):
            if getattr(self, name) < 1:
                raise PadlmError(f"--{name.replace('_', '-')} must be >= 1", param=name)
        for name in ("max_queue", "max_queue_tokens"):
            if getattr(self, name) < 0:
                raise PadlmError(f"--{name.replace('_', '-')} must be >= 0", param=name)
        if self.max_n is not None and not 1 <= self.max_n <= self.max_batch_size:
            raise PadlmError("--max-n must be between 1 and --max-batch-size", param="max_n")
        for name in ("request_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise PadlmError(f"--{name.removesuffix('_s').replace('_', '-')} must be a "
                                 "positive number of seconds", param=name)
        if self.api_key is not None and not self.api_key.strip():
            raise PadlmError("--api-key must not be empty", param="api_key")

    @property
    def n_limit(self) -> int:
        return self.max_n or self.max_batch_size


def default_allowed_hosts(bind: str) -> tuple[str, ...] | None:
    """Loopback names when the server listens on loopback (a DNS-rebinding page then cannot
    reach it under its own name); any host otherwise (the operator knows the public names
    and can list them with ``--allowed-hosts``)."""
    if bind == "localhost":
        return LOOPBACK_HOSTS
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return None
    return LOOPBACK_HOSTS if loopback else None


def split_list(value: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")`` for comma-separated options."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())
