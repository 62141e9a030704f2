"""Text and JSON files of data folders, read with errors that name the file and line.

Python's own errors name neither, and two of them are no VLPruneError a user is shown in one
line: the UnicodeDecodeError of a file saved in another encoding, and the RecursionError of
JSON nested thousands deep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vl_prune.errors import VLPruneError


def utf8(raw: bytes, path: Path | str, first_line: int = 1) -> str:
    """`raw` (from `path`, starting at line `first_line`) decoded as UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise VLPruneError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8"
        ) from exc


def parse_json(text: str, path: Path | str, first_line: int = 1) -> Any:
    """JSON text (from `path`, starting at line `first_line`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise VLPruneError(f"{path}:{line}: not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise VLPruneError(f"{path}:{first_line}: JSON nested too deeply to read") from exc


def read_json(path: Path | str) -> Any:
    """The content of a UTF-8 JSON file."""
    return parse_json(utf8(Path(path).read_bytes(), path), path)
