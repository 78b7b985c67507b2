"""``padlm bench``: speed of every strategy measured in ONE run, reported as ratios.

Shared machines are noisy, so absolute numbers from different runs are not comparable; the
ratios to ``base`` inside one run are. Every row decodes a fixed number of tokens (EOS
ignored), after a warm-up, and reports the median of the repeats.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from collections.abc import Callable

import torch

from padlm.bench.kit import machine_provenance, ratio, render_table, time_runs
from padlm.core.config import GenerationConfig
from padlm.core.engine import Personalizer
from padlm.core.kvstream import decoder_of
from padlm.core.persrm import ADAPTER_NAME, PersonalizedRewardModel
from padlm.core.prompting import render
from padlm.core.strategies import ArgsStrategy, PadStrategy, make_scorer
from padlm.errors import PadlmError
from padlm.orchestration.experts import engine_experts

BENCH_PROMPT = (
    "I am preparing a short talk for a community science evening. Explain why the sky looks "
    "blue during the day but turns red and orange at sunset. Cover what sunlight is made of, "
    "what happens when light meets the molecules in the air, why shorter wavelengths scatter "
    "more than longer ones, and why the path length of light through the atmosphere changes "
    "at sunset. Finish with one simple experiment people can try at home with a glass of "
    "water, a torch and a little milk to see the same effect."
)
BENCH_PREFERENCE = "P1A"
BENCH_COMBINATION = "P1A+P2B+P3A"  # mix and soups: three experts
BENCH_STRATEGIES = ("base", "prompt", "pad", "pad-echo-guard", "pad-conditioned",
                    "pad-unconditioned", "pad-lora", "linear-alignment", "args",
                    "args-persrm", "mix", "soups", "reference-pad")


def lora_persrm(engine: Personalizer) -> PersonalizedRewardModel:
    """A PersRM on the general path: a LoRA (r=16) on its own copy of the base backbone.
    Its adapter is freshly initialised; speed does not depend on what it learned."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                        exclude_modules=["lm_head"])
    backbone = get_peft_model(copy.deepcopy(engine.lm.model), config, adapter_name=ADAPTER_NAME)
    persrm = PersonalizedRewardModel.identity(engine.lm.name, engine.lm.model.config.hidden_size)
    persrm.head.to(engine.lm.device)
    persrm.config.lora = True
    persrm.backbone = backbone.eval()
    return persrm


def reference_pad(engine: Personalizer, prompt_ids: list[int], new_tokens: int,
                  top_k: int = 10, weight: float = 1.0) -> list[int]:
    """PAD in twenty lines, as a specification and as the released code's computation
    pattern (the timing baseline): batch 1, greedy, no KV cache, the base model and the
    PersRM (head on the shared backbone, reference = the preference-conditioned base) each
    recompute the whole sequence at every step. At each step, over the base's top-k
    candidates ``a``: ``score(a) = z_b(a) + w * (log softmax_k z_R(a) - log softmax_k z_b(a))``.
    Returns the new tokens; the engine's ``pad`` gives the same ones (tested)."""
    model = engine.lm.model
    lm_head = model.get_output_embeddings().weight
    ids = torch.tensor([prompt_ids], device=lm_head.device)
    with torch.inference_mode():
        for _ in range(new_tokens):
            base_logits = model(input_ids=ids).logits[:, -1].float()
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
            reward_logits = engine.persrm.reward_logits(hidden[0], lm_head)[None, -1]
            top = base_logits.topk(top_k, dim=-1).indices
            score = base_logits.gather(1, top) + weight * (
                reward_logits.gather(1, top).log_softmax(-1)
                - base_logits.gather(1, top).log_softmax(-1))
            ids = torch.cat([ids, top.gather(1, score.argmax(-1, keepdim=True))], dim=1)
    return ids[0, len(prompt_ids):].tolist()


class ForwardCounter:
    """Counts transformer-body forward calls of the given models while active."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.decoders = {id(m): m for m in (decoder_of(m) for m in models)}.values()
        self.calls = 0

    def __enter__(self) -> ForwardCounter:
        self.handles = [d.register_forward_pre_hook(self._count) for d in self.decoders]
        return self

    def _count(self, *args) -> None:
        self.calls += 1

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def runner_for(engine: Personalizer, strategy: str, batch_size: int, new_tokens: int,
               top_k: int | None = None) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    """A zero-argument function that decodes one batch, and the models it runs. ``top_k``:
    the guided strategies' candidates (None: each strategy's default)."""
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, top_k=top_k)
    prompts = [BENCH_PROMPT] * batch_size
    if strategy == "pad-echo-guard":  # the default pad plus the guard's per-step lookups
        strategy, config = "pad", dataclasses.replace(config, echo_guard=True)
    if strategy == "reference-pad":
        ids = render(engine.lm.tokenizer, BENCH_PROMPT, engine.request(
            BENCH_PROMPT, BENCH_PREFERENCE).preference.text, engine.placement)
        return (lambda: [reference_pad(engine, ids, new_tokens) for _ in prompts],
                [engine.lm.model])
    if strategy.startswith("pad-"):
        if strategy == "pad-lora":
            persrm = lora_persrm(engine)
        else:  # the default head with its reward measured against the named reference
            persrm = copy.copy(engine.persrm)
            persrm.config = dataclasses.replace(engine.persrm.config,
                                                reference=strategy.removeprefix("pad-"))
        pad = PadStrategy(engine.lm, persrm, engine.placement)
        models = [persrm.backbone or engine.lm.model]
        return (lambda: engine.batch(pad).run(
            [engine.request(p, BENCH_PREFERENCE, config) for p in prompts]), models)
    if strategy == "args-persrm":  # ARGS scored by the PersRM: incremental, one head product
        args = ArgsStrategy(engine.lm, make_scorer("persrm", engine.lm, engine.persrm),
                            engine.placement)
        return (lambda: engine.batch(args).run(
            [engine.request(p, BENCH_PREFERENCE, config) for p in prompts]), [engine.lm.model])
    spec = engine.strategy(strategy).spec  # (a bad name fails here, early)
    if spec.uses_experts:
        preference, models = BENCH_COMBINATION, engine_experts(engine).stream_models()
    else:
        preference, models = BENCH_PREFERENCE, [engine.lm.model]
    if spec.uses_persrm and engine.persrm.separate:
        models.append(engine.persrm.guide.model)
    return (lambda: engine.generate(prompts, preference, strategy, config,
                                    batch_size=batch_size), models)


def bench(engine: Personalizer, strategies: list[str], batch_sizes: list[int],
          new_tokens: int, repeats: int, progress: Callable[[str], None] = lambda s: None,
          top_k: int | None = None) -> dict:
    unknown = [s for s in strategies if s not in BENCH_STRATEGIES]
    if unknown:
        raise PadlmError(f"unknown bench strategy {', '.join(unknown)}; choose from "
                         f"{', '.join(BENCH_STRATEGIES)}")
    source = provenance(engine, strategies)  # the code and guides as the run starts
    rows = []
    for batch_size in batch_sizes:
        base_ms = None
        for strategy in (["base"] if "base" not in strategies else []) + strategies:
            if strategy == "reference-pad" and batch_size > 1:
                continue  # the released code has no batching: its row is batch 1 only
            run, models = runner_for(engine, strategy, batch_size, new_tokens, top_k)
            counter = ForwardCounter(models)
            seconds = statistics.median(time_runs(run, repeats, during=counter))
            total = batch_size * new_tokens
            ms = 1000 * seconds / total
            base_ms = ms if strategy == "base" else base_ms
            row = {"strategy": strategy, "batch_size": batch_size, "new_tokens": new_tokens,
                   "ms_per_token": round(ms, 2), "tokens_per_second": round(total / seconds, 2),
                   "overhead_vs_base": ratio(ms, base_ms, 3),
                   "forward_passes_per_token": round(counter.calls / (repeats * new_tokens), 2)}
            progress(json.dumps(row))
            if strategy in strategies:
                rows.append(row)
    return {**source, "top_k": top_k, "prompt_tokens": len(render(
        engine.lm.tokenizer, BENCH_PROMPT)), "rows": rows}


def provenance(engine: Personalizer, strategies: list[str]) -> dict:
    """Everything a speed figure depends on besides the code: machine, dtype, threads,
    library versions and the fingerprints of the guides that ran."""
    uses_experts = bool({"mix", "soups"} & set(strategies))
    persrm = None if engine.persrm_refusal() else engine.persrm
    return {**machine_provenance(engine.lm.device), "model": engine.lm.name,
            "dtype": engine.lm.dtype_name,
            "persrm": persrm and {"path": persrm.path, "fingerprint": persrm.fingerprint(),
                                  "reference": persrm.reference, **guide_size(engine, persrm)},
            "experts": ({"fingerprint": engine_experts(engine).fingerprint()} if uses_experts
                        else None)}


def guide_size(engine: Personalizer, persrm: PersonalizedRewardModel) -> dict:
    """A separate guide's name and size against the base's: what its cost over base is
    measured against."""
    if not persrm.separate:
        return {}
    guide, base = parameter_count(persrm.guide.model), parameter_count(engine.lm.model)
    return {"guide": persrm.guide.name, "guide_parameters": guide, "base_parameters": base,
            "guide_to_base_parameters": round(guide / base, 4)}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def markdown_table(result: dict) -> str:
    lines = [render_table(
        ("strategy", "batch", "ms/token", "tokens/s", "vs base", "forwards/token"),
        ((r["strategy"], r["batch_size"], r["ms_per_token"], r["tokens_per_second"],
          f"{r['overhead_vs_base']}x", r["forward_passes_per_token"]) for r in result["rows"]))]
    persrm = result.get("persrm") or {}
    if "guide" in persrm:
        lines.append(f"\npad's guide: {persrm['guide']}, a separate model of "
                     f"{persrm['guide_parameters']:,} parameters against the base's "
                     f"{persrm['base_parameters']:,} (guide/base "
                     f"{persrm['guide_to_base_parameters']}), reference {persrm['reference']}")
    return "\n".join(lines)


def record_table(record: dict) -> str:
    """A recorded run as one line per strategy and a column group per batch size (what the
    reports print), with the provenance that makes its ratios comparable."""
    sizes = sorted({r["batch_size"] for r in record["rows"]})
    by_strategy: dict[str, dict[int, dict]] = {}
    for r in record["rows"]:
        by_strategy.setdefault(r["strategy"], {})[r["batch_size"]] = r
    head = ["strategy"]
    for b in sizes:
        head += [f"batch {b} ms/token", "tokens/s", "vs base"]
    body = []
    for strategy, rows in by_strategy.items():
        cells: list[object] = [strategy]
        for b in sizes:
            r = rows.get(b)
            cells += ([r["ms_per_token"], r["tokens_per_second"], f"{r['overhead_vs_base']}x"]
                      if r else ["-", "-", "-"])
        body.append([*cells, next(iter(rows.values()))["forward_passes_per_token"]])
    lines = [render_table([*head, "forwards/token"], body)]
    lines.append(f"\n{record.get('device_name')}, {record.get('dtype')}, "
                 f"{record.get('threads')} threads, torch {record.get('torch')}, commit "
                 f"{record.get('commit')}: `{record.get('command')}`")
    return "\n".join(lines)
