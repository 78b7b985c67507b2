"""Which code produced a record: the git commit of the checkout padlm runs from.

Standard library only, so the GPU check's driver can read it before anything is installed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it (a number
    from uncommitted code says so); None outside a git checkout."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty.strip() else "")
