"""vl_prune's cache folder (`$VL_PRUNE_HOME`, default ~/.cache/vl_prune): embedded data sets
and pre-trained tiny weights, each built once and then reused."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vl_prune.errors import VLPruneError
from vl_prune.files import remove, write_folder
from vl_prune.locks import locked


def home() -> Path:
    return Path(os.environ.get("VL_PRUNE_HOME", "~/.cache/vl_prune")).expanduser()


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """`home()/name`, made by `build(folder)` on first use (atomically, see `write_folder`).

    In a multi-process job one process per machine builds it while the others wait, then
    read it: N ranks building the same folder would do the work N times and all write. Other
    jobs and commands wait on its lock (`vl_prune.locks`) while one builds it."""
    final = home() / name
    # Every rank passes the barrier, found or not: a rank that skipped it because another had
    # just built the folder would meet the others' barrier at its next collective call.
    with local_main_first() as builder:
        if builder:
            return _build(final, build)
    if not final.is_dir():
        raise VLPruneError(f"{final} is missing: this machine's main process did not build it")
    return final


@contextmanager
def local_main_first() -> Iterator[bool]:
    """Run the block on each machine's main process first, then on the others; yields
    whether this is that main process (always, outside a multi-process job)."""
    from vl_prune.distributed import process_state

    state = process_state()
    first = state.is_local_main_process
    if not first:
        state.wait_for_everyone()
    try:
        yield first
    finally:
        # Reached on failure too, so the waiting processes go on (and fail on the missing
        # result) rather than hang in their barrier.
        if first:
            state.wait_for_everyone()


def _build(final: Path, build: Callable[[Path], None]) -> Path:
    if final.is_dir():
        return final
    with build_once(final) as needed:
        if needed:
            write_folder(final, build)
    return final


@contextmanager
def build_once(final: Path) -> Iterator[bool]:
    """Hold the lock of the cache entry `final` (a file or folder) for the block, which builds
    it if this yields True: it is still missing (another process may have built it while this
    one waited), and what interrupted builds left of it is gone."""
    # In a multi-process job the other ranks wait at a barrier meanwhile: a wait as long as
    # another process's build of the same entry (minutes), well within the barrier's timeout.
    with locked(final):
        if final.exists():
            yield False
        else:
            remove_partial(final)
            yield True


#: what an interrupted build of the entry `<entry>` leaves beside it: `write_folder`'s
#: `.<entry>.<8 random characters>` folders and `atomic_write`'s `… .tmp` files
PARTIAL = re.compile(r"\.(?P<entry>.+)\.[^./]{8}(\.tmp)?")


def remove_partial(final: Path) -> None:
    """Delete what interrupted builds of `final` left beside it; the caller holds `final`'s
    lock, so no build of it is running."""
    for path in final.parent.iterdir() if final.parent.is_dir() else ():
        found = PARTIAL.fullmatch(path.name)
        if found and found["entry"] == final.name:
            remove(path)
