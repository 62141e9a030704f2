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

_OPEN: dict[tuple[Path, int, int], Any] = {}


def arrow_module() -> Any:
    try:
        import pyarrow
    except ImportError as exc:
        raise VLPruneError(
            "reading ViLT's .arrow tables needs pyarrow: pip install 'vl-prune[vilt]'"
        ) from exc
    return pyarrow


def table(path: Path) -> Any:
    """The table of an Arrow IPC file, memory-mapped once per process (again if the file is
    rewritten: a stale map of a rewritten file would read garbage)."""
    path = Path(path)
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _OPEN:
        pa = arrow_module()
        for old in [k for k in _OPEN if k[0] == path]:
            del _OPEN[old]
        try:
            _OPEN[key] = pa.ipc.RecordBatchFileReader(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise VLPruneError(f"{path}: not an Arrow IPC file ({exc})") from exc
    return _OPEN[key]


#: the kinds of values `columns` checks: a string, an integer, a number, and lists of them
KINDS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _is(value: Any, kind: str) -> bool:
    """Whether `value` is of `kind`: a name of KINDS, or `[kind]` for a list of them."""
    if kind.startswith("["):
        return isinstance(value, list) and all(_is(v, kind[1:-1]) for v in value)
    return KINDS[kind](value)


def columns(path: Path, kinds: dict[str, str]) -> dict[str, list]:
    """The named columns of a table as Python lists, every value of its kind (`"[[str]]"`:
    a list of lists of strings); a missing column or a value of another kind (a null, a string
    where ViLT's writers put a list) is an error naming the file, column and row."""
    content = table(path)
    out = {}
    for name, kind in kinds.items():
        check_column(path, name)
        values = content.column(name).to_pylist()
        for row, value in enumerate(values):
            if not _is(value, kind):
                raise VLPruneError(
                    f"{path}: row {row}, column {name!r}: expected {kind}, got {value!r:.60}"
                )
        out[name] = values
    return out


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
