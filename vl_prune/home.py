"""vl_prune's cache folder (`$VL_PRUNE_HOME`, default ~/.cache/vl_prune): embedded data sets
and pre-trained tiny weights, each built once and then reused."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vl_prune.errors import VLPruneError
from vl_prune.files import write_folder


def home() -> Path:
    return Path(os.environ.get("VL_PRUNE_HOME", "~/.cache/vl_prune")).expanduser()


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """`home()/name`, made by `build(folder)` on first use (atomically, see `write_folder`).

    In a multi-process job one process per machine builds it while the others wait, then
    read it: N ranks building the same folder would do the work N times and all write."""
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
    try:
        return write_folder(final, build)
    except (OSError, VLPruneError):
        if final.is_dir():  # another process built the same folder first
            return final
        raise
