"""Atomic file writes: a crash or a failed write never leaves a half-written or clobbered file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vl_prune.errors import VLPruneError

# Read once: os.umask can only be read by setting it, which would race with other threads.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise VLPruneError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            # mkstemp creates files readable by the owner only; give the usual umask mode.
            os.fchmod(out.fileno(), 0o666 & ~_UMASK)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder(path: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Fill a new folder through `build(folder)` under a temporary name, then rename it: an
    interrupted build never leaves a folder that looks complete. An existing `path` must be
    empty."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise VLPruneError(f"{path} exists and is not empty; choose a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        build(partial)
        if path.exists():
            path.rmdir()
        os.replace(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or folder (with what it holds), if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
