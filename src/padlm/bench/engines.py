"""One speed comparison of the two engines on the same requests: ``pad`` tokens/s.

``python -m padlm.bench.engines --persrm DIR`` (in the vLLM environment; DIR a conditioned
PersRM). Each engine decodes the same ``--batch-size`` prompts once to warm up and then
``--repeats`` times, a fixed number of tokens (EOS ignored), greedy, one preference; the
median tokens/s of each is printed as one JSON line. The engines run one after the other, not
in turns: on a CPU, an idle vLLM engine's worker keeps its OpenMP threads busy, which slowed
the HF engine beside it 2.5x in a trial here. A ``__main__`` guard is required: vLLM's
V1 engine spawns its engine core, which re-imports the entry script.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

from padlm.bench.kit import ratio, time_runs
from padlm.core.config import GenerationConfig
from padlm.core.engine import Personalizer
from padlm.vllm.engine import VllmPersonalizer

PROMPTS = ("Explain how a rainbow forms.", "Why do cats purr?", "What is a black hole?",
           "How do vaccines work?", "Why is the sky blue?", "What causes the seasons?",
           "How does a refrigerator keep food cold?", "Why do we dream?")


def tokens_per_second(generate: Callable[[list[str]], object], prompts: list[str], tokens: int,
                      repeats: int) -> float:
    """Median over ``repeats`` timed calls, after one warm-up call."""
    seconds = time_runs(lambda: generate(prompts), repeats)
    return statistics.median(len(prompts) * tokens / s for s in seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persrm", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--preference", default="P1A")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    hf = Personalizer(args.model, persrm=args.persrm)
    hf_rate = tokens_per_second(
        lambda p: hf.generate(p, args.preference, "pad", config, batch_size=len(p)),
        prompts, args.max_new_tokens, args.repeats)
    vllm = VllmPersonalizer(args.model, persrm=args.persrm, max_model_len=1024)
    vllm_rate = tokens_per_second(lambda p: vllm.generate(p, args.preference, "pad", config),
                                  prompts, args.max_new_tokens, args.repeats)
    print(json.dumps({"strategy": "pad", "batch_size": args.batch_size,
                      "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                      "hf_tokens_per_s": round(hf_rate, 1),
                      "vllm_tokens_per_s": round(vllm_rate, 1),
                      "speedup": ratio(vllm_rate, hf_rate, 2)}))


if __name__ == "__main__":
    main()
