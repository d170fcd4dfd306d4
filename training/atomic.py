"""Files that appear whole or not at all: written under a temp name in their own folder, then renamed.

A killed writer leaves only `.tmp-<name>.<random>` files, never a truncated file under the final
name, so a reader (or a resumed run) trusts whatever it finds under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

TMP_PREFIX = ".tmp-"  # what a resumed run may delete: `<folder>.glob(".tmp-*")`


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temp file beside `path`, which then replaces `path` in one rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the files are read by other users and tools
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_npy(path: Path, arr: np.ndarray) -> int:
    """`np.save` under `path` (a file object: np.save appends `.npy` to a name without it); returns the size."""

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, save)
    return path.stat().st_size
