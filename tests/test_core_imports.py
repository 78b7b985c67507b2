"""The kernel names no feature: no module under ``padlm/core/`` imports a feature package,
at module level or inside a function, so orchestration, the server, vLLM, training, the
evaluation and the benchmarks plug in around it (the registry finds plugged-in strategies
through the ``padlm.plugins`` entry point)."""

from __future__ import annotations

import ast
from pathlib import Path

import padlm

PACKAGE = Path(padlm.__file__).parent
FEATURES = ("bench", "cli", "data", "evaluation", "judges", "orchestration", "server",
            "training", "vllm")


def imported_modules(source: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in ``source`` names."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def feature_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "padlm" and len(parts) > 1 and parts[1] in FEATURES else None


def test_the_walk_sees_a_feature_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from padlm.orchestration.experts import load_experts\n"
                     "from padlm import server\n")
    assert {feature_of(m) for m in imported_modules(probe)} >= {"orchestration", "server"}


def test_no_core_module_imports_a_feature_package():
    core = sorted((PACKAGE / "core").glob("*.py"))
    assert len(core) >= 10  # the kernel lives there
    found = {f"{source.name} imports {module}"
             for source in core for module in imported_modules(source) if feature_of(module)}
    assert not found, sorted(found)
