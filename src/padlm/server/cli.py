"""``padlm serve`` and ``padlm bench serve``: registered by ``padlm.cli``."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from padlm.cli_options import (
    DeviceOption,
    DtypeOption,
    EngineOption,
    ExpertsOption,
    ModelOption,
    PersRMOption,
    PlacementOption,
    ReferenceOption,
    ScorerOption,
)
from padlm.errors import PadlmError
from padlm.server.settings import ServerSettings

DEFAULTS = ServerSettings()  # the options' defaults are the settings' own


def check_port(host: str, port: int) -> None:
    """Fail with one line, before loading any model, when the address is unusable."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise PadlmError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    reference: ReferenceOption = None,
    experts: ExpertsOption = "default",
    scorer: ScorerOption = None,
    placement: PlacementOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Rows decoding together, at most.")
                              ] = DEFAULTS.max_batch_size,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond that; more get 429.")
                         ] = DEFAULTS.max_queue,
    max_queue_tokens: Annotated[int, typer.Option(
        help="Tokens the waiting requests may add up to, prompt tokens prefilled plus rows x "
             "max_tokens; more get 429.")] = DEFAULTS.max_queue_tokens,
    max_tokens_cap: Annotated[int, typer.Option(help="max_tokens of one choice, at most.")
                              ] = DEFAULTS.max_tokens_cap,
    max_prompt_tokens: Annotated[int, typer.Option(
        help="Prompt tokens one request may prefill, over all its rows and lanes (pad "
             "prefills each prompt twice); more get 400.")] = DEFAULTS.max_prompt_tokens,
    prefill_chunk_tokens: Annotated[int, typer.Option(
        help="Prompt tokens prefilled per decode step: a long prompt joins a chunk at a "
             "time, so it delays the other rows by about one chunk per step.")
                                    ] = DEFAULTS.prefill_chunk_tokens,
    max_prompt_chars: Annotated[int, typer.Option(
        help="Characters of all messages or prompts of a request, checked before "
             "tokenizing; more get 400.")] = DEFAULTS.max_prompt_chars,
    max_preference_chars: Annotated[int, typer.Option(
        help="Characters of a free-text preference, at most.")
                                    ] = DEFAULTS.max_preference_chars,
    max_stop_chars: Annotated[int, typer.Option(help="Characters of each stop string, at most.")
                              ] = DEFAULTS.max_stop_chars,
    max_top_k: Annotated[int, typer.Option(
        help="pad.top_k, at most (a batch's pad rows all widen to the largest k).")
                         ] = DEFAULTS.max_top_k,
    max_n: Annotated[int | None, typer.Option(
        help="n and best_of, at most (default: --max-batch-size).")] = None,
    request_timeout: Annotated[float, typer.Option(
        help="Seconds a request may take, queue included; then a 504.")
                               ] = DEFAULTS.request_timeout_s,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get a 413.")
                              ] = DEFAULTS.max_body_bytes,
    drain_timeout: Annotated[float, typer.Option(
        help="On SIGTERM, seconds running requests may still finish.")
                             ] = DEFAULTS.drain_timeout_s,
    max_connections: Annotated[int, typer.Option(
        help="Open connections (and requests), at most; requests beyond get 503.")
                               ] = DEFAULTS.max_connections,
    keep_alive_timeout: Annotated[float, typer.Option(
        help="Seconds an idle keep-alive connection stays open.")
                                  ] = DEFAULTS.keep_alive_timeout_s,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a connection has to send a complete request head; then it closes.")
                              ] = DEFAULTS.header_timeout_s,
    body_timeout: Annotated[float, typer.Option(
        help="Seconds a request body may take in all; then a 408.")] = DEFAULTS.body_timeout_s,
    body_chunk_timeout: Annotated[float, typer.Option(
        help="Seconds a request body may pause between two parts; then a 408.")
                                  ] = DEFAULTS.body_chunk_timeout_s,
    max_header_bytes: Annotated[int, typer.Option(
        help="Bytes of a request head, at most; larger ones get 400.")
                                ] = DEFAULTS.max_header_bytes,
    api_key: Annotated[str | None, typer.Option(
        envvar="PADLM_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer <key>' on every /v1 route.")] = None,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Comma-separated Host names to answer ('*': any); default: the loopback "
             "names when bound to loopback, else any.")] = None,
    cors_origins: Annotated[str | None, typer.Option(
        help="Comma-separated browser origins allowed to call the API (CORS).")] = None,
    served_model_name: Annotated[list[str] | None, typer.Option(
        help="A name the model answers to (repeatable); default: the model's own.")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
    engine_name: EngineOption = "hf",
) -> None:
    """Serve the OpenAI API with per-request preferences (and a playground page at /)."""
    import logging

    from padlm.registry import check_scorer
    from padlm.server.app import create_app, make_server
    from padlm.server.settings import default_allowed_hosts, split_list

    if not 0 <= port <= 65535:
        raise PadlmError(f"--port must be in 0..65535, got {port}")
    settings = ServerSettings(
        max_batch_size=max_batch_size, max_queue=max_queue, max_queue_tokens=max_queue_tokens,
        max_tokens_cap=max_tokens_cap, max_prompt_tokens=max_prompt_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens, max_prompt_chars=max_prompt_chars,
        max_preference_chars=max_preference_chars, max_stop_chars=max_stop_chars,
        max_top_k=max_top_k, max_n=max_n, request_timeout_s=request_timeout,
        max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout,
        max_connections=max_connections, keep_alive_timeout_s=keep_alive_timeout,
        header_timeout_s=header_timeout, body_timeout_s=body_timeout,
        body_chunk_timeout_s=body_chunk_timeout, max_header_bytes=max_header_bytes,
        api_key=api_key,
        allowed_hosts=(default_allowed_hosts(host) if allowed_hosts is None
                       else split_list(allowed_hosts)),
        cors_origins=split_list(cors_origins),
        served_model_names=tuple(served_model_name or ()))
    if scorer is not None:
        check_scorer(scorer)
    check_port(host, port)
    if not logging.getLogger().handlers:  # the access log and the worker's warnings
        logging.basicConfig(level=log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
    from padlm.engines import open_engine

    engine = open_engine(engine_name, model, persrm=persrm, dtype=dtype, placement=placement,
                         device=device, experts=experts, scorer=scorer, reference=reference)
    make_server(create_app(engine, settings), host, port, log_level,
                on_exit=engine.close if engine_name == "vllm" else None).run()


def vllm_args(
    model: ModelOption = "default",
    persrm: PersRMOption = "default",
    dtype: DtypeOption = None,
    placement: PlacementOption = None,
) -> None:
    """The flags that make vLLM's own OpenAI server run padlm's PAD (plugin model class,
    PersRM, logits processors), shell-quoted: `eval "python -m
    vllm.entrypoints.openai.api_server $(padlm vllm-args) --tensor-parallel-size 4"`
    (dtype default: this machine's)."""
    import shlex

    from padlm.config import GenerationConfig
    from padlm.vllm.engine import VllmPersonalizer

    engine = VllmPersonalizer(model, persrm=persrm, dtype=dtype, placement=placement)
    engine.check("pad", GenerationConfig())  # a PersRM this engine cannot run is refused
    print(shlex.join(engine.server_args()))


def register(app: typer.Typer) -> None:
    """Add ``padlm serve``, ``padlm vllm-args`` and ``padlm bench serve``."""
    from padlm.bench_cli import bench_app
    from padlm.server.bench import bench_serve

    app.command("serve")(serve)
    app.command("vllm-args")(vllm_args)
    bench_app.command("serve")(bench_serve)
