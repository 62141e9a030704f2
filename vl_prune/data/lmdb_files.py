"""LMDB databases (UNITER's txt_db and img_db) opened read-only, once per process.

py-lmdb refuses to open an environment twice in one process, and an environment opened before a
fork must not be used in the child (which py-lmdb, remembering it, would refuse to open anew).
So every environment is closed just before the process forks (DataLoader workers), and each
process opens its own again when it next reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vl_prune.errors import VLPruneError

_OPEN: dict[Path, Any] = {}


def _close_all() -> None:
    for env in _OPEN.values():
        env.close()
    _OPEN.clear()


os.register_at_fork(before=_close_all)


def lmdb_module() -> Any:
    try:
        import lmdb
    except ImportError as exc:
        raise VLPruneError(
            "reading UNITER's txt_db and img_db needs lmdb, msgpack and lz4: "
            "pip install 'vl-prune[uniter]'"
        ) from exc
    return lmdb


def environment(path: Path) -> Any:
    """This process's read-only environment of the LMDB folder `path`. Without locking, so
    that read-only copies of a data set work; without readahead, as reads are random."""
    key = Path(path)
    if key not in _OPEN:
        lmdb = lmdb_module()
        if not (path / "data.mdb").is_file():
            raise VLPruneError(f"{path}: not an LMDB folder (no data.mdb)")
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, create=False, readahead=False)
        except lmdb.Error as exc:
            raise VLPruneError(f"{path}: not a readable LMDB folder ({exc})") from exc
        _check_complete(env, path)
        _OPEN[key] = env
    return _OPEN[key]


def _check_complete(env: Any, path: Path) -> None:
    """The data file must hold every page the database uses: LMDB maps the file into memory,
    and reading a page past the end of a truncated copy kills the process (SIGBUS)."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (path / "data.mdb").stat().st_size
    if size < needed:
        env.close()
        raise VLPruneError(
            f"{path}: data.mdb is truncated ({size:,} bytes of the {needed:,} its pages need); "
            "copy or download it again"
        )


def read(path: Path, key: str) -> bytes | None:
    """The value stored under `key` (UTF-8), or None; a damaged database is an error naming
    the folder and key."""
    lmdb = lmdb_module()
    try:
        with environment(path).begin(buffers=False) as txn:
            return txn.get(key.encode("utf-8"))
    except lmdb.Error as exc:
        raise VLPruneError(f"{path}: cannot read key {key!r} ({exc})") from exc


def stored_keys(path: Path) -> list[str]:
    """Every key of the database (UTF-8), read without their values."""
    lmdb = lmdb_module()
    try:
        with environment(path).begin() as txn:
            return [key.decode("utf-8") for key in txn.cursor().iternext(values=False)]
    except (lmdb.Error, UnicodeDecodeError) as exc:
        raise VLPruneError(f"{path}: cannot read the database's keys ({exc})") from exc
