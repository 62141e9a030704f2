"""Atomic file writes: a crash or a failed write never leaves a half-written or clobbered file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vl_prune.errors import VLPruneError


def atomic_write(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    `durable=False` skips the fsync, for files that can be made again (the world's images).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise VLPruneError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            # mkstemp creates files readable by the owner only; give the usual umask mode.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(out.fileno(), 0o666 & ~umask)
            out.write(data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
