"""LXMERT's region features: `*_obj36.tsv` files, one image a line.

Each line holds ten tab-separated fields, as LXMERT's `load_obj_tsv` reads them: `img_id`,
`img_h`, `img_w`, `objects_id`, `objects_conf`, `attrs_id`, `attrs_conf`, `num_boxes`, `boxes`
(pixel x1, y1, x2, y2) and `features`, the arrays base64 of their little-endian bytes. The files
are tens of gigabytes: rather than load them whole as LXMERT does, each file is scanned once for
where every image's line starts (kept under `$VL_PRUNE_HOME/tsv_index/`), and an image's line is
read when asked for. Boxes are normalised by the image's size as LXMERT normalises them, then
given UNITER's width and height columns; every region is kept (36 a line in LXMERT's files).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import sys
from functools import cached_property
from pathlib import Path

import numpy as np

from vl_prune.data.regions import Regions
from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write

FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
# Files smaller than this are scanned again on each run (in well under a second) rather than
# leave an index file in $VL_PRUNE_HOME.
INDEXED_BYTES = 64 * 1024 * 1024
# A box may reach past the image by LXMERT's tolerance.
TOLERANCE = 1e-5
# What separates the words of image ids and file names: COCO_train2014_…, train-10171-0-img0.
_WORD = re.compile(r"[_\-]")


class TsvFeatures:
    """One LXMERT feature file: which images it holds, and their regions."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @cached_property
    def lines(self) -> dict[str, tuple[int, int]]:
        """img_id → (byte offset, line number) of its line: read from the index cache, else
        found by one pass over the file (no feature is decoded) and cached (small files are
        scanned each time)."""
        stat = self.path.stat()
        if stat.st_size < INDEXED_BYTES:
            return self._scan()
        identity = f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        cache = _index_folder() / f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.json"
        if not cache.is_file():
            from vl_prune.home import build_once

            with build_once(cache) as needed:  # one process indexes; the others wait
                if needed:
                    atomic_write(cache, json.dumps(self._scan()).encode())
        return {key: tuple(value) for key, value in json.loads(cache.read_text()).items()}

    def _scan(self) -> dict[str, tuple[int, int]]:
        from tqdm.auto import tqdm

        lines: dict[str, tuple[int, int]] = {}
        offset = 0
        bar = tqdm(
            total=self.path.stat().st_size,
            desc=f"indexing {self.path.name} (once)",
            unit="B",
            unit_scale=True,
            leave=False,
            disable=not sys.stderr.isatty(),
        )
        with self.path.open("rb") as file, bar:
            for number, line in enumerate(file, 1):
                bar.update(len(line))
                image = line.split(b"\t", 1)[0].decode("utf-8", errors="replace")
                if line.strip():
                    if image in lines:
                        raise VLPruneError(
                            f"{self.path}:{number}: image {image!r} is also on line "
                            f"{lines[image][1]}"
                        )
                    lines[image] = (offset, number)
                offset += len(line)
        return lines

    def regions(self, image: str) -> Regions:
        """`features` (N × D float32) and `norm_bb` (N × 6: x1, y1, x2, y2, w, h, normalised
        by the image's size) of one image of the file."""
        offset, number = self.lines[image]
        with self.path.open("rb") as file:
            file.seek(offset)
            line = file.readline()
        return parse_line(line, f"{self.path}:{number}: image {image!r}")


def parse_line(line: bytes, where: str) -> Regions:
    """The regions of one line of an LXMERT feature file; `where` names it in errors."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != len(FIELDS):
        raise VLPruneError(f"{where}: {len(fields)} tab-separated fields, LXMERT's have 10")
    item = dict(zip(FIELDS, fields, strict=True))
    try:
        height, width, boxes = (int(item[name]) for name in ("img_h", "img_w", "num_boxes"))
    except ValueError as exc:
        raise VLPruneError(f"{where}: img_h, img_w and num_boxes must be integers") from exc
    if height <= 0 or width <= 0 or boxes <= 0:
        raise VLPruneError(f"{where}: img_h, img_w and num_boxes must be positive")
    pixel = _array(item, "boxes", np.float32, (boxes, 4), where)
    features = _array(item, "features", np.float32, (boxes, -1), where)
    if not np.isfinite(features).all() or not np.isfinite(pixel).all():
        raise VLPruneError(f"{where}: features or boxes hold NaN or infinite values")
    xyxy = pixel / np.array([width, height, width, height], dtype=np.float32)
    if (xyxy < -TOLERANCE).any() or (xyxy > 1 + TOLERANCE).any():
        raise VLPruneError(f"{where}: boxes reach past the image's {width} × {height} pixels")
    size = xyxy[:, 2:] - xyxy[:, :2]
    return {"features": features, "norm_bb": np.concatenate([xyxy, size], axis=1)}


def _array(item: dict, name: str, dtype: type, shape: tuple[int, int], where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(item[name], validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    except (binascii.Error, ValueError) as exc:
        raise VLPruneError(
            f"{where}: field {name!r} is not base64 of {shape[0]} rows of {np.dtype(dtype)}"
        ) from exc


def _index_folder() -> Path:
    from vl_prune.home import home

    return home() / "tsv_index"


def find_tsv_files(folder: Path) -> list[Path]:
    """LXMERT's feature files in `folder` and the folders under it (its `data/` layout keeps
    them in `mscoco_imgfeat/`, `vg_gqa_imgfeat/`, `nlvr2_imgfeat/`): `*obj*.tsv`."""
    return sorted({*folder.glob("*obj*.tsv"), *folder.glob("*/*obj*.tsv")})


class TsvStore:
    """Every LXMERT feature file of a data folder, looked up by image id. A file is indexed
    only when an image is looked for in it, those whose name shares a word with the image id
    first (`train2014_obj36.tsv` for `COCO_train2014_…`): a split reads the files it needs."""

    def __init__(self, folder: Path):
        self.files = [TsvFeatures(path) for path in find_tsv_files(Path(folder))]
        self._holder: dict[str, TsvFeatures | None] = {}

    def has(self, image: str) -> bool:
        return self._file(image) is not None

    def regions(self, image: str) -> Regions:
        file = self._file(image)
        if file is None:
            raise VLPruneError(f"no LXMERT feature file holds image {image!r}")
        return file.regions(image)

    def _file(self, image: str) -> TsvFeatures | None:
        if image not in self._holder:
            words = set(_WORD.split(image.lower()))
            likely = sorted(
                self.files, key=lambda f: not words & set(_WORD.split(f.path.stem.lower()))
            )
            self._holder[image] = next((f for f in likely if image in f.lines), None)
        return self._holder[image]


_OPENED: dict[Path, TsvStore] = {}


def open_tsv_store(folder: Path) -> TsvStore:
    """The feature files of `folder`, indexed once per process."""
    folder = Path(folder)
    if folder not in _OPENED:
        _OPENED[folder] = TsvStore(folder)
    return _OPENED[folder]
