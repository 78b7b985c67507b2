"""``--engine vllm``: padlm's strategies on a vLLM engine, with padlm's own arguments.

:class:`VllmPersonalizer` takes what :class:`padlm.core.engine.Personalizer` takes (a model name or
directory, a PersRM, a dtype, a placement), renders every context with padlm's prompting (so
both engines see the same token ids), and returns :class:`padlm.core.engine.Generation` objects.
It runs ``base``, ``prompt`` and ``pad`` (a conditioned, head-only PersRM); everything else
is refused naming the strategy and the engine. Greedy output equals the HF engine's token for
token (``tests/test_vllm.py``); sampled output does not (vLLM draws its own random numbers).

vLLM is imported when an engine is made, never at padlm import time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from padlm.core.config import GenerationConfig
from padlm.core.decoding import Request, StepEvent
from padlm.core.devices import AUTO, default_dtype, resolve_device
from padlm.core.engine import Generation, ServedModel
from padlm.core.guides import resolve_persrm
from padlm.core.models import DEFAULT_MODEL, eos_ids, resolve_model_path
from padlm.core.persrm import PersRMConfig
from padlm.core.planning import plan
from padlm.core.preferences import parse_preference
from padlm.core.prompting import DEFAULT_PLACEMENT, check_placement
from padlm.core.registry import check_request, strategy_class
from padlm.core.strategies import render_lanes
from padlm.errors import PadlmError
from padlm.vllm.requests import (
    ADDITIONAL_CONFIG_KEY,
    ENGINE,
    EXTRA_KEY,
    SUPPORTED,
    check_persrm,
    engine_refusal,
    padlm_architecture,
    repetition_extra_args,
)

if TYPE_CHECKING:
    from padlm.vllm.batch import VllmBatch, VllmRouter

PROCESSOR = "padlm.vllm.processor:PadLogitsProcessor"
CPU_MAX_MODEL_LEN = 4096  # default context on vLLM's CPU build (see VllmPersonalizer)
# before PAD's, so PAD takes its candidates from the controlled logits, as the HF loop does
REPETITION_PROCESSOR = "padlm.vllm.repetition:RepetitionLogitsProcessor"


def vllm_logs_to_stderr() -> None:
    """Send vLLM's logs to stderr, in this process and the engine processes it starts.

    vLLM configures its own ``vllm`` logger with a handler on ``VLLM_LOGGING_STREAM``, stdout
    by default, so ``padlm generate --engine vllm --json`` wrote ~50 log lines among its JSON
    lines. The variable is read when ``vllm`` is first imported, and vLLM's engine core and
    workers inherit it, so it is set here before any import (a value the user set is kept);
    should vLLM already be imported, its handlers on stdout are moved to stderr too.
    """
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if "vllm" not in sys.modules or os.environ["VLLM_LOGGING_STREAM"] != "ext://sys.stderr":
        return
    for handler in logging.getLogger("vllm").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def require_vllm():
    """The ``vllm`` module, or a one-line error saying where it is installed. Its logs go to
    stderr (:func:`vllm_logs_to_stderr`): stdout is for padlm's output."""
    vllm_logs_to_stderr()
    try:
        import vllm
    except ImportError as error:
        raise PadlmError(f"--engine vllm needs vLLM, which this environment lacks ({error}): "
                         "make setup-vllm, then use .venv-vllm/bin/padlm") from None
    return vllm


def cpu_kv_cache_gib(engines: int = 1) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` for each of ``engines`` engines: together a quarter of the
    free memory (vLLM's own default can exceed it on a small machine), at least 1 GiB each."""
    free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return max(1, int(free_gib / 4 / engines))


def cpu_environment() -> None:
    """Defaults for vLLM's CPU build where the user set none (inherited by the processes
    vLLM spawns): the KV cache of :func:`cpu_kv_cache_gib` and OpenMP on every core (vLLM's
    default leaves one idle)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib()))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")


# what ``--persrm default`` means here: the one-lane PersRM first, the only one vLLM runs
VLLM_SHIPPED_PREFERENCE = ("conditioned", "default")


@dataclass(frozen=True)
class PersRMChoice:
    """The PersRM asked for, and why ``pad`` cannot run on it (None: it can)."""

    path: str | None  # None: the identity PersRM
    config: PersRMConfig | None
    refusal: PadlmError | None  # raised when a pad request comes

    @property
    def runnable(self) -> bool:
        return self.refusal is None


def choose_persrm(persrm: str | None, model_name: str) -> PersRMChoice:
    """What vLLM can run of the PersRM ``--persrm`` names (:func:`resolve_persrm`, with
    ``default`` preferring the shipped ``conditioned`` PersRM): a conditioned head on this
    very model. Anything else (the identity, another model's PersRM, a separate guide) is kept
    as a refusal for ``pad`` only, so ``base`` and ``prompt`` still run; a path to nothing is
    refused at once."""
    source = resolve_persrm(persrm, model_name, VLLM_SHIPPED_PREFERENCE).require()
    if source.kind == "identity":
        return PersRMChoice(None, None, engine_refusal(
            "pad", "it needs a PersRM directory (--persrm DIR); the identity PersRM is the "
            "base model"))
    if source.kind != "padlm":
        return PersRMChoice(source.spec, None, engine_refusal(
            "pad", f"{source.spec} is a guide model of its own, which runs beside the base as "
                   f"a separate guide"))
    directory = str(source.directory)
    if source.shares_backbone:
        try:
            check_persrm(source.config, directory)
        except PadlmError as refusal:
            return PersRMChoice(directory, source.config, refusal)
        return PersRMChoice(directory, source.config, None)
    if persrm == "default":  # no shipped PersRM fits: asked for none in particular
        return PersRMChoice(None, None, engine_refusal(
            "pad", f"the shipped PersRMs were trained on {source.base_model}, not "
                   f"{model_name}: pass --persrm with a PersRM trained on {model_name}"))
    return PersRMChoice(directory, source.config, engine_refusal(
        "pad", f"PersRM {persrm} was trained on {source.base_model}, not {model_name}, so it "
               f"steers {model_name} as a separate guide, reading {model_name}'s tokens with "
               f"{source.base_model}'s tokenizer (its ids where the two tokenizers share a "
               f"vocabulary, else their text)"))


class VllmPersonalizer:
    """A vLLM engine (``vllm.LLM``) serving padlm's ``base``, ``prompt`` and ``pad``.

    ``engine_args`` go to ``vllm.LLM`` unchanged (``max_model_len``, ``enforce_eager``,
    ``tensor_parallel_size``, ...). On vLLM's CPU build :func:`cpu_environment` fills in
    ``VLLM_CPU_KVCACHE_SPACE`` and ``VLLM_CPU_OMP_THREADS_BIND`` where they are unset.
    """

    engine_name = ENGINE

    def __init__(self, model: str = DEFAULT_MODEL, persrm: str | None = "default",
                 dtype: str | None = None, placement: str | None = None,
                 **engine_args: Any) -> None:
        if placement is not None:
            check_placement(placement)
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.path = resolve_model_path(model)
        # the HF engine's name for a named model is its directory's (load_model)
        self.model_name = Path(self.path).name if Path(self.path).is_dir() else model
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.hf_config = AutoConfig.from_pretrained(self.path)
        try:
            generation = GenerationConfig.from_pretrained(self.path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation = None
        self.eos_ids = eos_ids(self.tokenizer, generation)
        self.persrm = choose_persrm(persrm, self.model_name)
        saved = self.persrm.config
        self.placement = placement or (saved.placement if saved else DEFAULT_PLACEMENT)
        architecture = padlm_architecture(self.hf_config.architectures or [])
        self.engine_args = {"model": self.path,
                            "dtype": dtype or default_dtype(resolve_device(AUTO)),
                            "hf_overrides": {"architectures": [architecture]},
                            "logits_processors": [REPETITION_PROCESSOR], **engine_args}
        if resolve_device(AUTO).type == "cpu" and "enable_chunked_prefill" not in engine_args:
            # vLLM's CPU build fails a whole step ("CPU Generator does not use offset") when a
            # seeded request's prefill is split across steps: prefill whole prompts instead.
            # A step then holds a whole context, and vLLM profiles one at start-up, so the
            # context is capped (32k tokens took 5 minutes to profile on 2 cores)
            length = int(engine_args.get("max_model_len") or min(
                self.hf_config.max_position_embeddings, CPU_MAX_MODEL_LEN))
            self.engine_args.update(
                enable_chunked_prefill=False, max_model_len=length,
                max_num_batched_tokens=max(length, int(engine_args.get(
                    "max_num_batched_tokens") or 0)))
        if self.persrm.runnable:
            self.engine_args.update(
                additional_config={ADDITIONAL_CONFIG_KEY: {
                    "persrm": str(Path(self.persrm.path).resolve())}},
                logits_processors=[REPETITION_PROCESSOR, PROCESSOR])

    @cached_property
    def llm(self):
        """The vLLM engine, started on first use (about a minute on a CPU), so that
        :meth:`check` can refuse a request before anything starts."""
        if resolve_device(AUTO).type == "cpu":
            cpu_environment()
        return require_vllm().LLM(**self.engine_args)

    def close(self) -> None:
        """Stop vLLM's engine processes now. Left to interpreter exit they can outlive it: a
        server stopped with SIGTERM left its engine core and a 9 GB worker running."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    @property
    def persrm_name(self) -> str:
        """The PersRM PAD runs with, as the HF engine names it (``identity``: none)."""
        return self.persrm.path or "identity"

    def generate(self, prompts: Sequence, preference: str | None = None,
                 strategy: str = "pad", config: GenerationConfig | None = None,
                 batch_size: int | None = None, n: int | None = None) -> list[Generation]:
        """Decode every prompt with one strategy. The HF engine's ``batch_size`` and ``n``
        are accepted so callers need not know the engine: vLLM schedules its own batches,
        and ``n`` serves only best-of-n, which this engine refuses."""
        config = config or GenerationConfig()
        requests = [plan(self, strategy, Request(p, parse_preference(preference), config))
                    for p in prompts]
        return self.generate_requests(requests, [strategy] * len(requests))

    def generate_requests(self, requests: Sequence[Request], strategies: Sequence[str]
                          ) -> list[Generation]:
        """Decode requests that each name their strategy, all in one vLLM batch (rows with
        different strategies, preferences and weights side by side)."""
        params = [self.sampling_params(r, s) for r, s in zip(requests, strategies,
                                                              strict=True)]
        prompts = [{"prompt_token_ids": self.planned_ids(request, name)}
                   for request, name in zip(requests, strategies, strict=True)]
        began = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = (time.perf_counter() - began) / max(len(requests), 1)
        return [_as_generation(output.outputs[0], request.config, seconds)
                for output, request in zip(outputs, requests, strict=True)]

    def prompt_ids(self, request: Request, strategy: str) -> list[int]:
        """The context's token ids, rendered as the HF engine renders this strategy's lane
        (vLLM gets ids, not text, so both engines see the same tokens)."""
        return render_lanes(self.tokenizer, request, (strategy_class(strategy).spec.lane,),
                            self.placement)[0]

    def planned_ids(self, request: Request, strategy: str) -> list[int]:
        """The context's token ids: as planned (:func:`padlm.core.planning.plan`), else rendered
        now (the request is checked then, too)."""
        if request.planned_for(strategy):
            return request.rendered.contexts[0][0]
        self.check(strategy, request.config)
        return self.prompt_ids(request, strategy)

    def server_args(self) -> list[str]:
        """This engine as flags of vLLM's own OpenAI server, for users who run it:
        ``python -m vllm.entrypoints.openai.api_server $(these flags)``; requests then ask
        for PAD with ``"vllm_xargs": {"padlm_weight": 0.8}`` and send :meth:`prompt_ids`
        (or text rendered the same way) as the prompt."""
        argv: list[str] = []
        for key, value in self.engine_args.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, dict):
                argv += [flag, json.dumps(value, separators=(",", ":"))]  # one word
            elif isinstance(value, list):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]
        return argv

    def check(self, strategy: str, config: GenerationConfig) -> None:
        """Refuse, before any engine starts, what this engine cannot run or would run with a
        different meaning."""
        check_request(strategy, config)  # unknown strategy, echo guard where it has no use
        if strategy not in SUPPORTED:
            needs = ("several contexts decoded in lock-step"
                     if strategy_class(strategy).spec.level == "token"
                     else "whole responses scored by padlm's own loop")
            raise engine_refusal(strategy, f"it needs {needs}; this engine runs "
                                 f"{', '.join(SUPPORTED)}")
        if strategy == "pad" and not self.persrm.runnable:
            raise self.persrm.refusal
        if config.reference not in (None, "base"):
            raise PadlmError(f"pad's reference {config.reference} cannot run on the {ENGINE} "
                             f"engine: it needs a second context or model in lock-step; this "
                             f"engine runs reference base only; use --engine hf",
                             param="reference")

    def sampling_params(self, request: Request, strategy: str, stream: bool = False):
        """padlm's settings as vLLM's (after :meth:`check`). ``stream``: for a
        :class:`~padlm.vllm.batch.VllmBatch`, which reads each step's new token ids and
        applies padlm's own stop rules to them (vLLM neither detokenizes nor stops on text)."""
        vllm = require_vllm()
        from vllm.sampling_params import RequestOutputKind

        config = request.config
        self.check(strategy, config)
        extra = repetition_extra_args(config)  # padlm's own, not vLLM's repetition_penalty
        if strategy == "pad":
            extra[EXTRA_KEY] = {"weight": config.weight, "top_k": config.top_k,
                                "echo_guard": config.echo_guard,
                                "preference": request.preference.text}
        text = {"output_kind": RequestOutputKind.DELTA, "detokenize": False} if stream else {
            "stop": list(config.stop) or None}
        return vllm.SamplingParams(max_tokens=config.max_new_tokens,
                                   temperature=config.temperature, top_p=config.top_p,
                                   seed=config.seed, ignore_eos=config.ignore_eos,
                                   extra_args=extra or None, **text)

    # --- serving: padlm serve --engine vllm ----------------------------------------------

    @cached_property
    def router(self) -> VllmRouter:
        from padlm.vllm.batch import VllmRouter

        return VllmRouter(self.llm.llm_engine)

    def batch(self, strategy: str) -> VllmBatch:
        """A view on the shared engine for one strategy's rows (the server's worker keeps
        one per strategy; vLLM batches them all together)."""
        from padlm.vllm.batch import VllmBatch

        self.check(strategy, GenerationConfig())
        return VllmBatch(self, self.router, strategy)

    def stream(self, prompt, preference: str | None = None, strategy: str = "pad",
               config: GenerationConfig | None = None) -> Iterator[StepEvent]:
        """Yield one event per generated token of a single prompt, as the HF engine does."""
        batch = self.batch(strategy)
        batch.join([plan(self, strategy, Request(prompt, parse_preference(preference),
                                                 config or GenerationConfig()))])
        while batch.rows:
            yield from batch.step()

    def contexts(self, strategy: str, request: Request) -> list[list[list[int]]]:
        """The one context this engine decodes for ``request`` (one stream, one lane)."""
        return [[self.prompt_ids(request, strategy)]]

    def served_model(self) -> ServedModel:
        """Starts the engine (the server needs its context length)."""
        import copy

        strategies = SUPPORTED if self.persrm.runnable else tuple(
            s for s in SUPPORTED if s != "pad")
        return ServedModel(
            self.model_name, copy.deepcopy(self.tokenizer),
            int(self.llm.llm_engine.model_config.max_model_len),
            int(self.hf_config.get_text_config().vocab_size), self.persrm.path,
            self.persrm.config, strategies, self.engine_name, False)


def _as_generation(completion, config: GenerationConfig, seconds: float) -> Generation:
    """vLLM's completion as padlm's Generation: the HF engine keeps no EOS token, so one that
    ended the response is dropped (vLLM reports it with ``stop_reason`` None or its id)."""
    tokens = list(completion.token_ids)
    ended_by_token = completion.finish_reason == "stop" and not isinstance(
        completion.stop_reason, str)
    if ended_by_token and tokens and not config.ignore_eos:
        tokens = tokens[:-1]
    return Generation(completion.text, tokens, completion.finish_reason or "length", seconds)
