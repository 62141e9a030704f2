"""A fingerprint of a data folder's contents, so runs and caches follow the data, not its path.

A copy, a moved folder or a symlinked one gives the same fingerprint; mtimes play no part, since
copies and checkouts reset them while the data stays the same. Small files (annotations, txt_db
meta, vocabularies) are hashed in full: a one-byte edit in an annotation changes what is trained.
Large files (LMDB `data.mdb`, feature TSVs, Arrow tables, big npz) are GB-scale, and reading them
whole would cost minutes on every run. For them only the size and fixed samples count (the first
and last MiB and a few evenly spaced blocks), so an edit in an unsampled stretch that keeps the
size goes unseen. Such stores are written once and replaced whole, which the size and samples
catch; in-place surgery on a feature store is the case given up for a constant cost per file.

Per-image files (feature `.npz`/`.npy`, pictures) count by name and size only: a folder of
120,000 of them is the feature index, and reading them all would cost what reading a feature
store whole does. Annotations, txt_db and img_db stores, TSV and Arrow tables are read as above.

Hidden names (editor and atomic-write temp files, `.DS_Store`), `__pycache__` and LMDB's
`lock.mdb` (rewritten by every reader) are not data, so they are skipped. The whole folder
counts, so a file added beside a task's data (another task's download) starts new runs: give
`--data` a folder of one task's files (links are followed) to keep runs across downloads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vl_prune.errors import VLPruneError

# Files up to this size are hashed in full; above it they are sampled.
FULL_HASH_BYTES = 8 * 1024 * 1024
EDGE_BYTES = 1024 * 1024
BLOCK_BYTES = 64 * 1024
MIDDLE_BLOCKS = 8
DIGEST_CHARS = 16
SKIPPED_NAMES = frozenset({"__pycache__", "lock.mdb"})
#: per-image files, counted by name and size
INDEXED_SUFFIXES = frozenset({".npz", ".npy", ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})


def data_fingerprint(path: Path) -> str:
    """DIGEST_CHARS hex characters of sha256 over the relative POSIX path, size and contents (or
    samples) of every data file under `path`, in sorted order; `path` may also be one file."""
    path = Path(path)
    if not path.exists():
        raise VLPruneError(f"data path {path} does not exist")
    digest = hashlib.sha256()
    try:
        # A lone file's own name is left out: the same file under another name is the same data.
        files = _walk(str(path), "", set()) if path.is_dir() else [(".", str(path))]
        for rel, file in sorted(files):
            digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + _file_digest(file))
    except OSError as err:
        raise VLPruneError(f"cannot read {err.filename} in data {path}: {err.strerror}") from err
    return digest.hexdigest()[:DIGEST_CHARS]


def _walk(folder: str, prefix: str, ancestors: set[str]) -> list[tuple[str, str]]:
    # Symlinked folders are followed (users link feature stores in); a folder already being
    # walked higher up is a cycle. Only ancestors count, so one store linked twice counts twice,
    # as it would in a copy.
    real = os.path.realpath(folder)
    if real in ancestors:
        return []
    files: list[tuple[str, str]] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIPPED_NAMES:
                continue
            rel = prefix + entry.name
            if entry.is_dir():
                files += _walk(entry.path, rel + "/", ancestors | {real})
            elif entry.is_file():  # broken links, fifos and sockets are not data
                files.append((rel, entry.path))
    return files


def _file_digest(file: str) -> bytes:
    if os.path.splitext(file)[1].lower() in INDEXED_SUFFIXES:
        return hashlib.sha256(os.stat(file).st_size.to_bytes(8, "little")).digest()
    with open(file, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        sha = hashlib.sha256(size.to_bytes(8, "little"))
        if size <= FULL_HASH_BYTES:
            sha.update(handle.read())
            return sha.digest()
        # Samples at offsets fixed by the size alone, so equal files are sampled alike.
        spots = [(0, EDGE_BYTES), (max(size - EDGE_BYTES, 0), EDGE_BYTES)]
        spots += [
            (max(size - BLOCK_BYTES, 0) * i // (MIDDLE_BLOCKS + 1), BLOCK_BYTES)
            for i in range(1, MIDDLE_BLOCKS + 1)
        ]
        for offset, length in spots:
            handle.seek(offset)
            sha.update(handle.read(length))
        return sha.digest()
