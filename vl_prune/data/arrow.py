"""ViLT's data: pyarrow tables (`nlvr2_train.arrow`, `vqav2_train.arrow`,
`f30k_caption_karpathy_test.arrow`, …), each an Arrow IPC file of one split, as ViLT's
`vilt/utils/write_*.py` write them: the images' encoded bytes in a binary column (`image`, or
`image_0` and `image_1` for NLVR2) beside their texts.

Tables are memory-mapped, not read: a task takes the text columns it needs, and an image's bytes
are decoded only when its batch is made (in a DataLoader worker).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vl_prune.errors import VLPruneError

_OPEN: dict[Path, Any] = {}


def arrow_module() -> Any:
    try:
        import pyarrow
    except ImportError as exc:
        raise VLPruneError(
            "reading ViLT's .arrow tables needs pyarrow: pip install 'vl-prune[vilt]'"
        ) from exc
    return pyarrow


def table(path: Path) -> Any:
    """The table of an Arrow IPC file, memory-mapped (once per process)."""
    path = Path(path)
    if path not in _OPEN:
        pa = arrow_module()
        try:
            _OPEN[path] = pa.ipc.RecordBatchFileReader(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise VLPruneError(f"{path}: not an Arrow IPC file ({exc})") from exc
    return _OPEN[path]


def columns(path: Path, names: tuple[str, ...]) -> dict[str, list]:
    """The named columns of a table as Python lists; a missing one is an error naming it."""
    content = table(path)
    missing = [name for name in names if name not in content.column_names]
    if missing:
        raise VLPruneError(
            f"{path}: no column {missing[0]!r} (it has {', '.join(content.column_names)})"
        )
    return {name: content.column(name).to_pylist() for name in names}


def check_column(path: Path, name: str) -> None:
    """The table must have a column `name` (an image column, read row by row later)."""
    if name not in table(path).column_names:
        names = ", ".join(table(path).column_names)
        raise VLPruneError(f"{path}: no column {name!r} (it has {names})")


@dataclass(frozen=True)
class ArrowImage:
    """An image kept in a table: its file, row and binary column."""

    path: Path
    row: int
    column: str

    def __str__(self) -> str:
        return f"{self.path.name}[{self.row}].{self.column}"

    def picture(self) -> Image.Image:
        raw = table(self.path).column(self.column)[self.row].as_py()
        if not isinstance(raw, bytes):
            raise VLPruneError(f"{self.path}: row {self.row}, column {self.column!r}: no image")
        try:
            with Image.open(io.BytesIO(raw)) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise VLPruneError(
                f"{self.path}: row {self.row}, column {self.column!r}: not a readable image ({exc})"
            ) from exc


def split_tables(data: Path, prefix: str, split: str) -> list[Path] | None:
    """The tables of `split`: `<prefix>_<part>.arrow` in the folder for each '+'-joined part
    (ViLT trains VQA on `train+trainable_val`). None when the folder has no `<prefix>_*.arrow`."""
    if not any(data.glob(f"{prefix}_*.arrow")):
        return None
    paths = []
    for part in split.split("+"):
        path = data / f"{prefix}_{part}.arrow"
        if not path.is_file():
            known = ", ".join(sorted(p.name for p in data.glob(f"{prefix}_*.arrow")))
            raise VLPruneError(f"{data}: split {split!r} needs {path.name} (found {known})")
        paths.append(path)
    return paths


def table_splits(data: Path, prefix: str) -> set[str]:
    """The splits the folder has tables of: `<prefix>_<split>.arrow`."""
    return {path.name[len(prefix) + 1 : -len(".arrow")] for path in data.glob(f"{prefix}_*.arrow")}
