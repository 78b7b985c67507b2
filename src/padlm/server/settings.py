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
MIN_PREFILL_CHUNK = 16


@dataclass(frozen=True)
class ServerSettings:
    """What ``padlm serve`` enforces; ``create_app(engine, **fields)`` overrides any field."""

    max_batch_size: int = 16  # rows decoding together, at most
    max_queue: int = 64  # requests waiting for rows, at most
    # tokens of the waiting requests, at most: each counts the prompt tokens it prefills
    # (over all rows and lanes) plus rows x max_tokens, so admission goes by the size of the
    # work, not the number of requests (one n=16 request is 16 rows; a 4k-token prompt with
    # max_tokens 1 is not a one-token job)
    max_queue_tokens: int = 65536
    max_tokens_cap: int = 4096  # max_tokens of one choice, at most
    # prompt tokens one request may prefill, over all its rows, lanes and streams (pad's
    # guided lane and best-of-n's samples each prefill the prompt again)
    max_prompt_tokens: int = 8192
    # prompt positions prefilled per decode step: a long prompt joins a chunk at a time
    # between the other rows' steps, so it delays them by about one chunk's forward per step
    prefill_chunk_tokens: int = 256
    # characters a request may send, checked before anything is tokenized (tokenizing is
    # CPU work proportional to the text): all messages or prompts together, the free-text
    # preference, and each stop string (matched against every row's text at every step)
    max_prompt_chars: int = 200_000
    max_preference_chars: int = 4_000
    max_stop_chars: int = 256
    # pad.top_k, at most: every pad row of a batch is padded to the largest k in it, so one
    # huge k would slow everyone's steps (the PAD paper uses 10)
    max_top_k: int = 64
    max_n: int | None = None  # n and best_of, at most (None: max_batch_size)
    request_timeout_s: float = 600.0  # a request still decoding after this fails with a 504
    max_body_bytes: int = 1 << 20  # request bodies beyond this get a 413
    # on SIGTERM running rows may finish for this long; then every open request gets a 503
    # (25 s: inside the 30 s a container orchestrator waits before it kills the process)
    drain_timeout_s: float = 25.0
    # connections: at most this many open (more get a 503), an idle keep-alive connection
    # closes after keep_alive_timeout_s, a request's headers must arrive within
    # header_timeout_s of the connection (or of the previous response), and a body within
    # body_timeout_s in all, with no gap longer than body_chunk_timeout_s (else a 408): a
    # client trickling bytes must not hold a connection forever
    max_connections: int = 1024
    keep_alive_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_chunk_timeout_s: float = 10.0
    max_header_bytes: int = 16384  # a request head larger than this is refused (h11)
    # then every /v1 route needs "Authorization: Bearer <key>" with one of these keys (kept
    # out of the repr/logs); each key is a tenant: its users' profiles are its own
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted; None: any
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    served_model_names: tuple[str, ...] = ()  # names the model answers to; (): its own name

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_cap", "max_body_bytes",
                     "max_prompt_tokens", "max_prompt_chars", "max_preference_chars",
                     "max_stop_chars", "max_top_k", "max_connections", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise PadlmError(f"--{name.replace('_', '-')} must be >= 1", param=name)
        if self.prefill_chunk_tokens < MIN_PREFILL_CHUNK:  # smaller chunks: a forward per token
            raise PadlmError(f"--prefill-chunk-tokens must be >= {MIN_PREFILL_CHUNK}",
                             param="prefill_chunk_tokens")
        for name in ("max_queue", "max_queue_tokens"):
            if getattr(self, name) < 0:
                raise PadlmError(f"--{name.replace('_', '-')} must be >= 0", param=name)
        if self.max_n is not None and not 1 <= self.max_n <= self.max_batch_size:
            raise PadlmError("--max-n must be between 1 and --max-batch-size", param="max_n")
        for name in ("request_timeout_s", "drain_timeout_s", "keep_alive_timeout_s",
                     "header_timeout_s", "body_timeout_s", "body_chunk_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise PadlmError(f"--{name.removesuffix('_s').replace('_', '-')} must be a "
                                 "positive number of seconds", param=name)
        for key in self.api_keys:
            if not key.strip():
                raise PadlmError("--api-key must not be empty", param="api_keys")
            if not (key.isascii() and key.isprintable()):
                # HTTP header values are bytes that clients encode differently (UTF-8,
                # Latin-1), so a non-ASCII key would match some clients and never others
                raise PadlmError("--api-key must be printable ASCII (HTTP clients encode "
                                 "other characters in headers differently)", param="api_keys")

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
