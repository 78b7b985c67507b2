"""Either engine behind one contract: padlm's own decode loop (``hf``, every strategy) or a
vLLM engine (``vllm``: base, prompt, pad with a PersRM trained on the served model). The CLI,
the server, the evaluation and the benchmarks open engines here and nowhere else."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from padlm.core.devices import AUTO, check_engine
from padlm.core.models import DEFAULT_MODEL
from padlm.errors import PadlmError

if TYPE_CHECKING:
    from padlm.core.config import GenerationConfig
    from padlm.core.decoding import DecodeBatch, Request, StepEvent
    from padlm.core.engine import Generation, ServedModel
    from padlm.vllm.batch import VllmBatch


class Engine(Protocol):
    """What both engines offer (``padlm.core.engine.Personalizer``,
    ``padlm.vllm.engine.VllmPersonalizer``), and all the server, the planner and the
    samplers call. Two things only padlm's own engine has, and an engine without them refuses
    the requests that need them first: ``strategy(name)`` (a sequence-level strategy's picker;
    ``check`` refuses best-of-n elsewhere) and ``persrm`` / ``lm`` for per-token rewards
    (``served_model().token_rewards`` is false elsewhere, so the planner refuses them)."""

    engine_name: str
    placement: str
    model_name: str

    @property
    def persrm_name(self) -> str: ...

    def check(self, strategy: str, config: GenerationConfig) -> None: ...

    def generate(self, prompts: Sequence, preference: str | None = None,
                 strategy: str = "pad", config: GenerationConfig | None = None,
                 batch_size: int = 8, n: int = 4) -> list[Generation]: ...

    def stream(self, prompt, preference: str | None = None, strategy: str = "pad",
               config: GenerationConfig | None = None) -> Iterator[StepEvent]: ...

    def served_model(self) -> ServedModel: ...

    def batch(self, strategy: str) -> DecodeBatch | VllmBatch: ...

    def contexts(self, strategy: str, request: Request) -> list[list[list[int]]]: ...


def open_engine(engine_name: str = "hf", model: str = DEFAULT_MODEL, *,
                persrm: str | None = "default", dtype: str | None = None,
                placement: str | None = None, device: str = AUTO, experts: str = "default",
                scorer: str | None = None, reference: str | None = None,
                guide_alignment: str = "auto") -> Engine:
    """The engine ``engine_name`` over ``model``; settings only padlm's loop has are refused
    for vLLM, all at once, before anything loads."""
    check_engine(engine_name)
    if engine_name == "vllm":
        given = [f"--{name}" for name, value, default in (
            ("device", device, AUTO), ("experts", experts, "default"), ("scorer", scorer, None),
            ("guide-alignment", guide_alignment, "auto")) if value != default]
        if reference not in (None, "base"):
            given.append("--reference")
        if given:
            raise PadlmError(f"{', '.join(given)} apply to --engine hf (vLLM places the model "
                             f"itself; mix, soups, args, best-of-n and pad with a reference "
                             f"other than base run on padlm's own loop)", param="engine")
        from padlm.vllm.engine import VllmPersonalizer

        return VllmPersonalizer(model, persrm=persrm, dtype=dtype, placement=placement)
    from padlm.core.engine import Personalizer

    return Personalizer(model, persrm=persrm, dtype=dtype, placement=placement, device=device,
                        components={"experts": experts}, scorer=scorer, reference=reference,
                        guide_alignment=guide_alignment)
