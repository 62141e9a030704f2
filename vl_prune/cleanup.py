"""What killed runs and builds leave behind, found and removed.

A kill can leave: `atomic_write`'s and `write_folder`'s temporary names; the training state of
a round killed between its `metrics.json` and the state's deletion (weights and optimizer: GB
at UNITER-base); saves older than the one `latest` names; LoRA adapters of a transfer whose
result was never written; partial builds of cache entries; lock files of killed processes. None
of it is ever read again. Whoever removes leftovers of a run folder holds its lock; elsewhere a
leftover counts only while no process holds the lock of what it belongs to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vl_prune.dense import CHECKPOINT, METRICS
from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write, remove
from vl_prune.home import PARTIAL
from vl_prune.locks import owner, remove_stale
from vl_prune.train import Checkpoints

#: `atomic_write`'s temporary files: `.<target>.<8 random characters>.tmp`
TEMPORARY = re.compile(r"\.(?P<target>.+)\.[^./]{8}\.tmp")
LOCK = re.compile(r"\.(?P<target>.+)\.lock")


@dataclass(frozen=True)
class Leftover:
    path: Path
    why: str

    @property
    def size(self) -> int:
        if not self.path.is_dir() or self.path.is_symlink():
            return self.path.lstat().st_size
        return sum(f.lstat().st_size for f in self.path.rglob("*") if f.is_file())

    def remove(self) -> None:
        if LOCK.fullmatch(self.path.name):
            remove_stale(self.path)  # unless its target was locked since it was found
        else:
            remove(self.path)


def run_leftovers(folder: Path, resume_points: bool = False) -> list[Leftover]:
    """What a run folder holds that no run will read (the caller holds its lock): temporary
    files, the training state of finished rounds and saves older than the latest; with
    `resume_points`, the training state of unfinished rounds too (they then train from their
    first step)."""
    found = [Leftover(p, "temporary file") for p in folder.rglob(".*.tmp") if _temporary(p)]
    for saves in sorted(folder.glob(f"seed_*/round_*/{CHECKPOINT}")):
        if (saves.parent / METRICS).is_file():
            found.append(Leftover(saves, "training state of a finished round"))
        elif resume_points:
            found.append(Leftover(saves, "resume point of an unfinished round"))
        else:
            try:
                stale = Checkpoints(saves, 1).stale()
            except VLPruneError:  # a damaged `latest`: resuming names it; leave it be
                stale = []
            found += [Leftover(p, "save older than the latest") for p in sorted(stale)]
    return found


def open_run_folder(
    folder: Path, config: dict[str, Any], log: Callable[[str], None] = lambda line: None
) -> None:
    """Create a run folder with its config.json, or clear what a killed run of it left (the
    caller holds its lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        atomic_write(folder / "config.json", json.dumps(config, indent=2).encode())
    if leftovers := run_leftovers(folder):
        size = sum(leftover.size for leftover in leftovers)
        for leftover in leftovers:
            leftover.remove()
        log(f"removed {len(leftovers)} leftovers of a killed run ({size / 1e6:.1f} MB)")


def transfer_leftovers(folder: Path) -> list[Leftover]:
    """Temporary files of a `transfer/` folder, and adapters of results never written, where
    no process is computing the result they belong to."""
    found = [
        Leftover(p, "temporary file")
        for p in sorted(folder.glob(".*.tmp"))
        if _temporary(p) and owner(folder / TEMPORARY.fullmatch(p.name)["target"]) is None
    ]
    for adapters in sorted(folder.glob("*.lora")):
        result = adapters.with_suffix(".json")
        if not result.is_file() and owner(result) is None:
            found.append(Leftover(adapters, "adapters of an unfinished transfer"))
    return found


def cache_leftovers(home: Path) -> list[Leftover]:
    """Partial builds of the cache's entries (`write_folder`'s `.<name>.<random>` folders and
    `atomic_write`'s temporary files) whose entry no process is building, and stale locks."""
    found = []
    for path in sorted(home.glob("*/.*")) if home.is_dir() else ():
        name = PARTIAL.fullmatch(path.name)
        if name and owner(path.parent / name["entry"]) is None:
            found.append(Leftover(path, "partial cache build"))
    for folder in sorted(home.iterdir()) if home.is_dir() else ():
        found += stale_locks(folder)
    return found


def stale_locks(folder: Path) -> list[Leftover]:
    """Lock files in `folder` that no process holds: their owners were killed."""
    found = []
    for path in sorted(folder.glob(".*.lock")) if folder.is_dir() else ():
        if owner(folder / LOCK.fullmatch(path.name)["target"]) is None:
            found.append(Leftover(path, "lock of a killed process"))
    return found


def _temporary(path: Path) -> bool:
    return TEMPORARY.fullmatch(path.name) is not None
