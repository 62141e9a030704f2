"""vl_prune's cache folder (`$VL_PRUNE_HOME`, default ~/.cache/vl_prune): embedded data sets
and pre-trained tiny weights, each built once and then reused."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("VL_PRUNE_HOME", "~/.cache/vl_prune")).expanduser()


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """`home()/name`, made by `build(folder)` on first use. The folder is filled under a temporary
    name and renamed when complete, so an interrupted build is never mistaken for a finished one."""
    final = home() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(partial)
        os.replace(partial, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process building the same
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final
