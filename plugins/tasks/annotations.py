"""Reading annotation files with errors that name file:line (JSON lines) or the file (JSON)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from vl_prune.data.text import parse_json, read_json, utf8
from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write


def json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, record) for every non-blank line; a line that is not a JSON object fails."""
    if not path.is_file():
        raise VLPruneError(f"{path}: annotation file is missing")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            line = utf8(raw, path, number)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = parse_json(line.rstrip("\r\n"), path, number)
            if not isinstance(record, dict):
                raise VLPruneError(f"{where}: expected a JSON object")
            yield where, record


def json_file(path: Path) -> Any:
    if not path.is_file():
        raise VLPruneError(f"{path}: annotation file is missing")
    return read_json(path)


def json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file: [i]`, record) for every record of a JSON list (LXMERT's annotation files)."""
    content = json_file(path)
    if not isinstance(content, list):
        raise VLPruneError(f"{path}: expected a JSON list of records")
    for i, record in enumerate(content):
        where = f"{path}: [{i}]"
        if not isinstance(record, dict):
            raise VLPruneError(f"{where}: expected a JSON object")
        yield where, record


def is_json_list(path: Path) -> bool:
    """Whether a JSON file holds a list (LXMERT's layout) rather than an object or lines."""
    if not path.is_file():
        return False
    with path.open("rb") as file:
        return file.read(64).lstrip().startswith(b"[")


def annotations(data: Path, subfolder: str, name: str) -> Path:
    """The folder holding the annotation file `name`: the data folder itself, or, in LXMERT's
    `data/` layout, its task folder (`data/vqa/train.json`)."""
    nested = data / subfolder
    return nested if not (data / name).is_file() and (nested / name).is_file() else data


def field(record: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """record[name], which must exist and be of `kind`."""
    if not isinstance(record, dict):
        raise VLPruneError(f"{where}: expected a JSON object, got {record!r:.40}")
    if name not in record:
        raise VLPruneError(f"{where}: field {name!r} is missing")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise VLPruneError(f"{where}: field {name!r} should be {kind.__name__}, got {value!r}")
    return value


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data).encode("utf-8"))


class _PlainUnpickler(pickle.Unpickler):
    """Admits plain containers, strings and numbers only: every class or function a pickle
    names is refused, since calling one is how a malicious pickle runs code."""

    def __init__(self, file: BinaryIO, path: Path):
        # Python 2's refer wrote str as bytes; they are UTF-8 (ASCII in the releases).
        super().__init__(file, encoding="utf-8")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise VLPruneError(
            f"{self.path}: refused to load {module}.{name}; a refs pickle holds only lists, "
            "dicts, strings and numbers"
        )


def load_plain_pickle(file: BinaryIO, path: Path) -> Any:
    """The content of a pickle of plain data (lists, dicts, strings, numbers)."""
    if path.stat().st_size == 0:
        raise VLPruneError(f"{path}: empty file (0 bytes)")
    try:
        return _PlainUnpickler(file, path).load()
    except VLPruneError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same here
        raise VLPruneError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
