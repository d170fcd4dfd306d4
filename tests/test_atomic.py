"""training/atomic.py: a file appears whole under its name or not at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.atomic import TMP_PREFIX, atomic_save_npy, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_npy_keeps_its_name_and_files_are_world_readable(tmp_path: Path) -> None:
    target = tmp_path / "tokens"  # np.save given a name would write tokens.npy
    size = atomic_save_npy(target, np.arange(5, dtype=np.uint16))
    assert np.load(target).tolist() == [0, 1, 2, 3, 4] and size == target.stat().st_size
    assert target.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
