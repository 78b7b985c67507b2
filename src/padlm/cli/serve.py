"""``padlm serve``."""

from __future__ import annotations

import socket
from typing import Annotated, Any

import typer

from padlm.cli.fields import FieldOptions, config_options
from padlm.cli.options import DEFAULT_PROFILE_AXES, ENGINE, ProfileAxesOption
from padlm.errors import PadlmError
from padlm.server.settings import ServerSettings

# The limits' help: ServerSettings (server/settings.py, owned by the server) explains them in
# comments only; these texts could move into its fields' metadata={"help": ...}.
LIMITS = FieldOptions(ServerSettings, (
    "max_batch_size", "max_queue", "max_queue_tokens", "max_tokens_cap", "max_prompt_tokens",
    "prefill_chunk_tokens", "max_prompt_chars", "max_preference_chars", "max_stop_chars",
    "max_top_k", "max_n", "request_timeout_s", "max_body_bytes", "drain_timeout_s",
    "max_connections", "keep_alive_timeout_s", "header_timeout_s", "body_timeout_s",
    "body_chunk_timeout_s", "max_header_bytes"),
    # the seconds' `_s` is the settings' unit; the options keep their published names
    names={name: name.removesuffix("_s") for name in (
        "request_timeout_s", "drain_timeout_s", "keep_alive_timeout_s", "header_timeout_s",
        "body_timeout_s", "body_chunk_timeout_s")},
    helps={
        "max_batch_size": "Rows decoding together, at most.",
        "max_queue": "Requests waiting beyond that; more get 429.",
        "max_queue_tokens": "Tokens the waiting requests may add up to, prompt tokens "
                            "prefilled plus rows x max_tokens; more get 429.",
        "max_tokens_cap": "max_tokens of one choice, at most.",
        "max_prompt_tokens": "Prompt tokens one request may prefill, over all its rows and "
                             "lanes (pad prefills each prompt twice); more get 400.",
        "prefill_chunk_tokens": "Prompt tokens prefilled per decode step: a long prompt joins "
                                "a chunk at a time, so it delays the other rows by about one "
                                "chunk per step.",
        "max_prompt_chars": "Characters of all messages or prompts of a request, checked "
                            "before tokenizing; more get 400.",
        "max_preference_chars": "Characters of a free-text preference, at most.",
        "max_stop_chars": "Characters of each stop string, at most.",
        "max_top_k": "pad.top_k, at most (a batch's pad rows all widen to the largest k).",
        "max_n": "n and best_of, at most (default: --max-batch-size).",
        "request_timeout_s": "Seconds a request may take, queue included; then a 504.",
        "max_body_bytes": "Larger request bodies get a 413.",
        "drain_timeout_s": "On SIGTERM, seconds running requests may still finish.",
        "max_connections": "Open connections (and requests), at most; requests beyond get "
                           "503.",
        "keep_alive_timeout_s": "Seconds an idle keep-alive connection stays open.",
        "header_timeout_s": "Seconds a connection has to send a complete request head; then "
                            "it closes.",
        "body_timeout_s": "Seconds a request body may take in all; then a 408.",
        "body_chunk_timeout_s": "Seconds a request body may pause between two parts; then a "
                                "408.",
        "max_header_bytes": "Bytes of a request head, at most; larger ones get 400.",
    })


def check_port(host: str, port: int) -> None:
    """Fail with one line, before loading any model, when the address is unusable."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise PadlmError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


@config_options(engine_args=ENGINE, limits=LIMITS)
def serve(
    *,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    engine_args: dict[str, Any],
    limits: dict[str, Any],
    api_key: Annotated[list[str] | None, typer.Option(
        envvar="PADLM_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer <key>' on every /v1 route (repeatable: each "
             "key is a tenant, whose users' profiles only its clients see).")] = None,
    profiles: Annotated[str, typer.Option(
        help="Where users' profiles live: sqlite:///PATH, postgresql://... (several "
             "replicas share one), or 'none'. Default: profiles.db under $PADLM_HOME.")
    ] = "default",
    profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Comma-separated Host names to answer ('*': any); default: the loopback "
             "names when bound to loopback, else any.")] = None,
    cors_origins: Annotated[str | None, typer.Option(
        help="Comma-separated browser origins allowed to call the API (CORS).")] = None,
    served_model_name: Annotated[list[str] | None, typer.Option(
        help="A name the model answers to (repeatable); default: the model's own.")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the OpenAI API with per-request preferences (and a playground page at /)."""
    import logging

    from padlm.core.registry import check_scorer
    from padlm.profiles.features import parse_axes
    from padlm.profiles.service import ProfileService, open_profiles
    from padlm.server.app import create_app, make_server
    from padlm.server.settings import default_allowed_hosts, split_list

    if not 0 <= port <= 65535:
        raise PadlmError(f"--port must be in 0..65535, got {port}")
    settings = ServerSettings(
        **limits, api_keys=tuple(api_key or ()),
        allowed_hosts=(default_allowed_hosts(host) if allowed_hosts is None
                       else split_list(allowed_hosts)),
        cors_origins=split_list(cors_origins),
        served_model_names=tuple(served_model_name or ()))
    if engine_args["scorer"] is not None:
        check_scorer(engine_args["scorer"])
    check_port(host, port)
    if not logging.getLogger().handlers:  # the access log and the worker's warnings
        logging.basicConfig(level=log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
    from padlm.engines import open_engine

    axes = parse_axes(profile_axes)  # refused before the model loads, as a bad store is
    store = open_profiles(profiles)
    engine = open_engine(**engine_args)
    service = ProfileService(store, axes=axes) if store is not None else None

    def close() -> None:
        if store is not None:
            store.close()
        if hasattr(engine, "close"):
            engine.close()

    make_server(create_app(engine, settings, service), host, port, log_level,
                on_exit=close).run()
