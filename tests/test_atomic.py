"""Atomic writes: all or nothing, and the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from padlm.atomic import UMASK, atomic_directory, write_text_atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_and_directories_get_the_umask_modes_not_private_ones(tmp_path):
    write_text_atomic(tmp_path / "a.json", "{}")
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "weights").write_text("w")
    assert mode(tmp_path / "a.json") == 0o666 & ~UMASK
    assert mode(tmp_path / "model") == 0o777 & ~UMASK


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("old")
    path.chmod(0o640)
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_a_failed_block_leaves_the_old_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "v").write_text("2")
        raise RuntimeError("crash mid-save")
    assert (target / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging left behind
