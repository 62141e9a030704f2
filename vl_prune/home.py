"""vl_prune's cache folder (`$VL_PRUNE_HOME`, default ~/.cache/vl_prune): embedded data sets
and pre-trained tiny weights, each built once and then reused."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vl_prune.errors import VLPruneError
from vl_prune.files import write_folder


def home() -> Path:
    return Path(os.environ.get("VL_PRUNE_HOME", "~/.cache/vl_prune")).expanduser()


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """`home()/name`, made by `build(folder)` on first use (atomically, see `write_folder`)."""
    final = home() / name
    if final.is_dir():
        return final
    try:
        return write_folder(final, build)
    except (OSError, VLPruneError):
        if final.is_dir():  # another process built the same folder first
            return final
        raise
