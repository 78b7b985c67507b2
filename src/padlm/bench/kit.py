"""What every benchmark shares: the clock, ratios, tables, progress lines and records.

Shared machines are noisy, so padlm's benchmarks compare within one run: each warms up, times
its runs on one clock, and reports ratios to a baseline measured in the same run. One table
renderer keeps every benchmark's output pasteable into the reports' markdown, and one record
writer gives every ``--record`` file the same command line and provenance. Light at import
(torch is loaded only to describe the machine) because ``padlm --help`` loads the serve bench.
"""

from __future__ import annotations

import contextlib
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from padlm.atomic import write_json_atomic
from padlm.provenance import source_commit

if TYPE_CHECKING:
    import torch


class Stopwatch:
    """Seconds since it was made, on ``perf_counter`` (monotonic and the finest clock), so
    that every benchmark's latencies and rates are measured alike."""

    def __init__(self) -> None:
        self.began = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def time_runs(run: Callable[[], object], repeats: int, warmups: int = 1,
              during: AbstractContextManager | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run``, after ``warmups`` untimed ones (the
    first call pays for compilation and allocation). ``during`` is entered around the timed
    calls only, e.g. a counter of forward passes that must not count the warm-up."""
    for _ in range(warmups):
        run()
    seconds = []
    with during or contextlib.nullcontext():
        for _ in range(repeats):
            clock = Stopwatch()
            run()
            seconds.append(clock.elapsed())
    return seconds


def ratio(value: float, baseline: float, digits: int) -> float | None:
    """``value / baseline`` rounded, None when the baseline measured nothing (every request
    of that level failed): a ratio to zero says nothing."""
    return round(value / baseline, digits) if baseline else None


def with_ratio_to_first(rows: Sequence[dict], value: str, name: str, digits: int = 2
                        ) -> list[dict]:
    """Each row with ``name``: its ``value`` as a ratio to the first row's, the baseline
    measured first in the same run."""
    first = rows[0][value]
    return [{**row, name: ratio(row[value], first, digits)} for row in rows]


def render_table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The one table renderer: markdown, as the reports paste it (cells as ``str`` gives
    them; an empty string is an empty cell)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def progress_printer() -> Callable[[str], None]:
    """Progress lines on stderr (stdout carries only the result), unhighlighted and unwrapped
    so a JSON line stays one line that can be parsed back."""
    from rich.console import Console

    console = Console(stderr=True)
    return lambda line: console.print(line, highlight=False, soft_wrap=True)


def device_name(device: torch.device) -> str:
    """What ran the numbers: the GPU's name on CUDA, the CPU's otherwise."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_provenance(device: torch.device) -> dict:
    """The machine, library versions and code behind a timing."""
    import torch
    import transformers

    return {"device": device.type, "device_name": device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": source_commit()}


def write_record(path: Path, payload: dict) -> None:
    """A benchmark's machine-written record: the command line that ran it, then ``payload``
    (atomically: a crash leaves the old file or the new one)."""
    write_json_atomic(path, {"command": shlex.join(["padlm", *sys.argv[1:]]), **payload})
