"""Turning texts and image names into a VLBatch for a backbone: tokens, and region features or
pixels read from a data folder.

A data folder holds pictures as `images/<name>.png` and region features either as
`features/<name>.npz` (UNITER's npz layout) or as a UNITER img_db under `img_db/` (LMDB).
"""

from __future__ import annotations

import io
import json
import re
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.errors import VLPruneError

MAX_TEXT = 40
# UNITER's convert_imgdir.py names a folder after its box filter; `_compressed` marks npz values.
IMG_DB_NAME = re.compile(r"feat_th(?P<th>[0-9.]+)_max(?P<max>\d+)_min(?P<min>\d+)(_compressed)?")
ZIP_MAGIC = b"PK\x03\x04"


class ImageStore:
    """The images of a data folder, as region features or as pictures.

    Region features of an image come from `features/<name>.npz` when that file exists, else from
    the UNITER img_db under `img_db/` (opened on first use). `img_db` names the LMDB folder to
    use (e.g. "feat_th0.2_max100_min10_compressed") where a split folder holds several;
    `key_prefix` is the data set prefix of UNITER's keys ("nlvr2_" for `nlvr2_dev-850-0-img0`).
    """

    def __init__(self, root: Path, img_db: str | None = None, key_prefix: str = ""):
        self.root = Path(root)
        self.img_db_choice = img_db
        self.key_prefix = key_prefix
        self._present: set[str] = set()

    def regions(self, name: str) -> dict[str, np.ndarray]:
        """`features` (N × D) and `norm_bb` (N × 6) of one image, UNITER's npz layout."""
        path = self.root / "features" / f"{name}.npz"
        if path.is_file():
            return _FEATURES.get(path)
        if (self.root / "img_db").is_dir():
            return self._img_db().regions(name, self.key_prefix)
        raise VLPruneError(f"{path}: region features of image {name!r} are missing")

    def picture(self, name: str) -> Image.Image:
        path = self.root / "images" / f"{name}.png"
        if not path.is_file():
            raise VLPruneError(f"{path}: image {name!r} is missing")
        with Image.open(path) as image:
            return image.convert("RGB")

    def has(self, name: str) -> bool:
        """Whether the folder holds the image in any form (npz, img_db entry or PNG): what a
        reader checks before accepting an annotation line."""
        if (self.root / "features" / f"{name}.npz").is_file():
            return True
        if (self.root / "images" / f"{name}.png").is_file():
            return True
        return (self.root / "img_db").is_dir() and self._img_db().has(name, self.key_prefix)

    def require(self, name: str, where: str) -> None:
        """A clear error at `where` when the image is missing; each name is looked up once, as
        annotation files ask many questions of one image."""
        if name in self._present:
            return
        if not self.has(name):
            raise VLPruneError(
                f"{where}: image {name} is missing (no features/{name}.npz, images/{name}.png "
                "or img_db entry)"
            )
        self._present.add(name)

    def _img_db(self) -> ImgDb:
        return open_img_db(self.root / "img_db", self.img_db_choice)


class ImgDb:
    """Region features in UNITER's img_db layout, read as its `DetectFeatLmdb` reads them.

    `img_db/<split>/feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]/` is an LMDB keyed by
    the feature file name (`nlvr2_dev-850-0-img0.npz`); split folders may also be left out. An
    image is looked up as `<prefix><name>.npz`, `<prefix><name>`, then without the prefix, in
    every split. Like UNITER, only the first nbb regions are kept (detectors list them by
    confidence): nbb from the `nbb_th…_max…_min….json` beside the LMDB, else computed from
    `conf` as UNITER does (those with conf > conf_th, but at least min_bb and at most max_bb).
    Values must be npz bytes, as `convert_imgdir.py --compress` writes them; the msgpack values
    of its default (uncompressed) form are refused with a clear error rather than read through
    one more dependency.
    """

    def __init__(self, folder: Path, choice: str | None = None):
        self.paths = _lmdb_folders(folder, choice)
        self.environments = [_environment(path) for path in self.paths]

    def has(self, name: str, prefix: str = "") -> bool:
        return self._find(_keys(name, prefix)) is not None

    def regions(self, name: str, prefix: str = "") -> dict[str, np.ndarray]:
        keys = _keys(name, prefix)
        found = self._find(keys)
        if found is None:
            where = ", ".join(str(path) for path in self.paths)
            raise VLPruneError(
                f"{where}: image {name!r} is not in the img_db (looked up {', '.join(keys)})"
            )
        path, key, value = found
        if not value.startswith(ZIP_MAGIC):
            raise VLPruneError(
                f"{path}: entry {key!r} is not npz; vl_prune reads UNITER's compressed img_db "
                "(convert_imgdir.py --compress), not its msgpack form"
            )
        try:
            with np.load(io.BytesIO(value)) as npz:
                dump = {field: npz[field] for field in ("features", "norm_bb", "conf")}
        except (OSError, ValueError, KeyError) as exc:
            raise VLPruneError(f"{path}: entry {key!r} is not region features ({exc})") from exc
        nbb = _box_count(path, key, dump["conf"])
        return {
            "features": dump["features"][:nbb],
            "norm_bb": dump["norm_bb"][:nbb].astype(np.float32),
        }

    def _find(self, keys: list[str]) -> tuple[Path, str, bytes] | None:
        for path, environment in zip(self.paths, self.environments, strict=True):
            with environment.begin() as txn:
                for key in keys:
                    value = txn.get(key.encode("utf-8"))
                    if value is not None:
                        return path, key, value
        return None


@cache
def open_img_db(folder: Path, choice: str | None = None) -> ImgDb:
    """The img_db under `folder`, opened once per process: tasks make an ImageStore per batch."""
    return ImgDb(folder, choice)


def _keys(name: str, prefix: str) -> list[str]:
    """UNITER keys an image by its feature file's name, which may carry a data set prefix."""
    return list(dict.fromkeys(f"{p}{name}{ext}" for p in (prefix, "") for ext in (".npz", "")))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """An npz feature file, whole (every region it holds), read-only."""
    try:
        with np.load(path) as npz:
            regions = {"features": npz["features"], "norm_bb": npz["norm_bb"]}
    except (OSError, ValueError, KeyError) as exc:
        raise VLPruneError(f"{path}: not a region feature file ({exc})") from exc
    for array in regions.values():
        array.setflags(write=False)  # shared by every later read of the file
    return regions


class _FeatureCache:
    """Feature files already read, the least recently used dropped beyond `limit` bytes.

    Every epoch reads each file again, and decompressing them cost a quarter of a world training
    step. A bound in bytes rather than files: a count small enough for UNITER's 36 × 2048 fp16
    regions (150 kB a file) made the world's 5,000 small images (16 kB) miss on almost every read.
    The file's mtime and size are part of the key, so a rewritten file is read again.
    """

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self.entries: OrderedDict[tuple[Path, int, int], dict[str, np.ndarray]] = OrderedDict()

    def get(self, path: Path) -> dict[str, np.ndarray]:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        regions = self.entries.get(key)
        if regions is not None:
            self.entries.move_to_end(key)
            return regions
        regions = self.entries[key] = _read_npz(path)
        self.size += _nbytes(regions)
        while self.size > self.limit and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.size -= _nbytes(dropped)
        return regions


def _nbytes(regions: dict[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in regions.values())


_FEATURES = _FeatureCache(limit=1 << 30)


def _lmdb_folders(folder: Path, choice: str | None) -> list[Path]:
    """The LMDB folder of each split under `folder` (or of `folder` itself)."""
    splits = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    found = []
    for split in splits:
        names = sorted(p.name for p in split.iterdir() if IMG_DB_NAME.fullmatch(p.name))
        if choice is not None:
            names = [n for n in names if n == choice]
        if len(names) > 1:
            raise VLPruneError(
                f"{split}: several img_db folders ({', '.join(names)}); choose one with img_db="
            )
        found += [split / n for n in names]
    if not found:
        wanted = choice or "feat_th*_max*_min*"
        raise VLPruneError(f"{folder}: no {wanted} LMDB folder (UNITER's img_db layout)")
    return found


@cache
def _environment(path: Path) -> Any:
    """One read-only LMDB environment per folder and process: py-lmdb refuses to open the same
    environment twice in a process. Without locking, so read-only copies of a data set work."""
    try:
        import lmdb
    except ImportError as exc:
        raise VLPruneError(f"{path}: install vl-prune[lmdb] to read UNITER img_db folders") from exc
    try:
        return lmdb.open(str(path), readonly=True, lock=False, create=False, readahead=False)
    except lmdb.Error as exc:
        raise VLPruneError(f"{path}: not an LMDB folder ({exc})") from exc


@cache
def _box_counts(path: Path) -> dict[str, int] | None:
    """UNITER's precomputed per-image box counts beside the LMDB folder, if any."""
    match = IMG_DB_NAME.fullmatch(path.name)
    counts = path.parent / f"nbb_th{match['th']}_max{match['max']}_min{match['min']}.json"
    if not counts.is_file():
        return None
    try:
        return json.loads(counts.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VLPruneError(f"{counts}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def _box_count(path: Path, key: str, conf: np.ndarray) -> int:
    """How many leading regions UNITER keeps (its `compute_num_bb` when nbb is not stored)."""
    counts = _box_counts(path)
    if counts is not None and key in counts:
        return int(counts[key])
    match = IMG_DB_NAME.fullmatch(path.name)
    keep = max(int(match["min"]), int((conf > float(match["th"])).sum()))
    return min(int(match["max"]), keep)


def encode(
    texts: list[str],
    images: list[str],
    backbone: Backbone,
    store: ImageStore,
    image_type: int = 1,
    pairs: list[str] | None = None,
) -> VLBatch:
    """One VLBatch: `texts` (with `pairs` as second segments, e.g. VCR answers) and the named
    images, as the backbone's image input wants them."""
    tokens = backbone.tokenizer(
        texts,
        pairs,
        padding=True,
        truncation=True,
        max_length=MAX_TEXT,
        return_tensors="pt",
    )
    batch = VLBatch(
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
        token_type_ids=tokens.get("token_type_ids"),
        image_type=image_type,
    )
    if backbone.image_input == "regions":
        regions = [store.regions(name) for name in images]
        for name, r in zip(images, regions, strict=True):
            if r["features"].ndim != 2 or r["features"].shape[1] != backbone.img_dim:
                raise VLPruneError(
                    f"region features of image {name!r} are {r['features'].shape[-1]}-d; "
                    f"{type(backbone).__name__} {backbone.preset} reads {backbone.img_dim}-d"
                )
        width = max(len(r["features"]) for r in regions)
        feats = torch.zeros(len(images), width, backbone.img_dim, dtype=torch.float16)
        boxes = torch.zeros(len(images), width, 6)
        mask = torch.zeros(len(images), width, dtype=torch.long)
        for i, r in enumerate(regions):
            n = len(r["features"])
            feats[i, :n] = torch.from_numpy(r["features"].astype(np.float16))
            boxes[i, :n] = torch.from_numpy(r["norm_bb"].astype(np.float32))
            mask[i, :n] = 1
        batch.region_feats, batch.region_boxes, batch.region_mask = feats, boxes, mask
    else:
        pixels = backbone.image_processor(
            [store.picture(name) for name in images], return_tensors="pt"
        )
        batch.pixel_values, batch.pixel_mask = pixels["pixel_values"], pixels["pixel_mask"]
    return batch
