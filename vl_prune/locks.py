"""One process at a time in a run folder or a cache entry: a lock file beside it.

The lock is the kernel's (`flock`), so it dies with its owner: a lock file left by a killed
process is stale by construction and simply taken (flock reaches NFS as fcntl locks on Linux).
The file names its owner (pid, host, command, since when) for whoever has to wait. A lock file
is only ever unlinked by a process holding its lock, so no two processes can hold one target.
"""

from __future__ import annotations

import errno
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

#: flock's answers on a file system that has no locks (some FUSE and CIFS mounts)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class Busy(VLPruneError):
    """The target is locked by another process, and the caller chose not to wait."""


def lock_file(target: str | os.PathLike) -> Path:
    """Where the lock of `target` (a folder or file, existing or not) lives: beside it, so
    renaming a finished build into place never moves or deletes the lock."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextmanager
def locked(
    target: str | os.PathLike, wait: bool = True, log: Callable[[str], None] = _stderr
) -> Iterator[None]:
    """Hold `target`'s lock for the block. While another process holds it: say who (through
    `log`; a wait of hours without a word would look like a hang) and wait, or with
    `wait=False` raise `Busy` naming it. Ctrl-C stops the wait."""
    path = lock_file(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, Path(target), wait, log)
    if fd is None:
        yield  # no locks on this file system: warned in `_acquire`
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        yield
    finally:
        # Unlinked while still held: a process that opened this file meanwhile finds, once it
        # holds it, that the path names another file (or none) and starts over.
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
        os.close(fd)


def owner(target: str | os.PathLike) -> str | None:
    """Who holds `target`'s lock, in words; None when nobody does (no file, or a stale one)."""
    try:
        fd = os.open(lock_file(target), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(lock_file(target))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def remove_stale(path: Path) -> bool:
    """Delete the lock file `path` if no process holds it (taking its lock to do so, as a
    release does); whether it was removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if _same_file(fd, path):
            path.unlink()
            return True
        return False
    finally:
        os.close(fd)


def _acquire(path: Path, target: Path, wait: bool, log: Callable[[str], None]) -> int | None:
    """An open descriptor of `path` holding its lock; None where the file system has none."""
    said = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise VLPruneError(f"cannot lock {target}: {path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise Busy(f"{target} is in use by {_describe(path)}") from None
                if not said:
                    log(f"waiting: {target} is in use by {_describe(path)}")
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in NO_LOCKS:
                raise
            log(
                f"warning: {path.parent} has no file locks ({exc.strerror}): nothing keeps "
                f"another process out of {target}"
            )
            return None
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
    except OSError as exc:
        if exc.errno == errno.ESTALE:  # NFS: the file was unlinked on another machine
            return False
        raise


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
        for _ in range(10):  # an owner that has just taken the lock writes its record next
            if text := path.read_text():
                break
            time.sleep(0.05)
        record = json.loads(text)
        return (
            f"pid {record['pid']} on {record['host']} ({record['command']}, since "
            f"{record['since']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # still writing its record, or not a vl_prune lock
