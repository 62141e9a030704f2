"""One process at a time in a run folder or a cache entry: a lock file beside it.

The lock is the kernel's (`flock`), so it dies with its owner: a lock file left by a killed
process is stale by construction and simply taken (flock reaches NFS as fcntl locks on Linux).
The file names its owner (pid, host, command, since when) for whoever has to wait.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vl_prune.errors import VLPruneError


def lock_file(target: str | os.PathLike) -> Path:
    """Where the lock of `target` (a folder or file, existing or not) lives: beside it, so
    renaming a finished build into place never moves or deletes the lock."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def locked(
    target: str | os.PathLike, log: Callable[[str], None] = lambda line: None
) -> Iterator[None]:
    """Hold `target`'s lock for the block; while another process holds it, say who (through
    `log`) and wait. Ctrl-C stops the wait."""
    path = lock_file(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, Path(target), log)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        yield
    finally:
        # Unlinked while still held: a process that opened this file meanwhile finds, once it
        # holds it, that the path names another file (or none) and starts over.
        path.unlink(missing_ok=True)
        os.close(fd)


def owner(target: str | os.PathLike) -> str | None:
    """Who holds `target`'s lock, in words; None when nobody does (no file, or a stale one)."""
    path = lock_file(target)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    finally:
        os.close(fd)
    return None


def _acquire(path: Path, target: Path, log: Callable[[str], None]) -> int:
    said = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise VLPruneError(f"cannot lock {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                log(f"waiting: {target} is in use by {_describe(path)}")
                said = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder unlinked it on release: lock the file now at the path


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _me() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(path: Path) -> str:
    """The owner a lock file names: "pid 123 on host (vlprune find …, since …)"."""
    try:
        record = json.loads(path.read_text())
        return (
            f"pid {record['pid']} on {record['host']} ({record['command']}, since "
            f"{record['since']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # still writing its record, or not a vl_prune lock
