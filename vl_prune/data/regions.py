"""Region features of one image as UNITER reads them: the box-count rule, and per-image npz
files (BUTD's `generate_npz` layout) read once and cached."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vl_prune.data.codecs import BadValue, decode_npz
from vl_prune.errors import VLPruneError

Regions = dict[str, np.ndarray]


@dataclass(frozen=True)
class RegionRule:
    """How many of an image's regions UNITER keeps (its `compute_num_bb`): those whose
    detector confidence is above `conf_th`, but at least `min_bb` and at most `max_bb`. The
    detector lists regions by confidence, so these are the first ones. UNITER's configs use
    0.2, 10 and 100; ground-truth boxes (`feat_numbb{N}` databases) keep N."""

    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10

    def count(self, conf: np.ndarray) -> int:
        return min(self.max_bb, max(self.min_bb, int((conf > self.conf_th).sum())))

    @property
    def name(self) -> str:
        """The suffix UNITER's img_db names carry for this rule: `th0.2_max100_min10`."""
        return f"th{self.conf_th}_max{self.max_bb}_min{self.min_bb}"


UNITER_RULE = RegionRule()


def cut(regions: Regions, count: int) -> Regions:
    """`features` and `norm_bb` of the first `count` regions, boxes as float32; copies, so that
    a cut kept in the cache does not hold on to every region of the file."""
    return {
        "features": regions["features"][:count].copy(),
        "norm_bb": regions["norm_bb"][:count].astype(np.float32),
    }


def checked(regions: Regions, where: str) -> Regions:
    """The value must hold `features` (N × D) and `norm_bb` (N × 6, UNITER's x1, y1, x2, y2,
    w, h) for the same N, and `conf` (N or N × 1) if present."""
    for name in ("features", "norm_bb"):
        if name not in regions:
            found = ", ".join(sorted(regions)) or "nothing"
            raise VLPruneError(f"{where}: no {name!r} array (found {found})")
    features, boxes = regions["features"], regions["norm_bb"]
    if features.ndim != 2:
        raise VLPruneError(f"{where}: 'features' has shape {features.shape}, expected N × D")
    if boxes.ndim != 2 or boxes.shape != (len(features), 6):
        raise VLPruneError(
            f"{where}: 'norm_bb' has shape {boxes.shape}, expected {len(features)} × 6 "
            "(x1, y1, x2, y2, w, h)"
        )
    conf = regions.get("conf")
    if conf is not None and conf.shape[:1] != (len(features),):
        raise VLPruneError(f"{where}: 'conf' has shape {conf.shape}, expected {len(features)}")
    if not np.isfinite(features).all() or not np.isfinite(boxes).all():
        raise VLPruneError(f"{where}: features or boxes hold NaN or infinite values")
    return regions


def read_feature_file(path: Path, rule: RegionRule = UNITER_RULE) -> Regions:
    """An npz feature file, cut by `rule` when it has detector confidences (files without
    `conf` keep every region), read-only."""
    try:
        regions = checked(decode_npz(path.read_bytes()), str(path))
    except BadValue as exc:
        raise VLPruneError(f"{path}: {exc}") from exc
    count = rule.count(regions["conf"]) if "conf" in regions else len(regions["features"])
    regions = cut(regions, count)
    for array in regions.values():
        array.setflags(write=False)  # shared by every later read of the file
    return regions


class FeatureCache:
    """Feature files already read, the least recently used dropped beyond `limit` bytes.

    Every epoch reads each file again, and decompressing them cost a quarter of a world training
    step. A bound in bytes rather than files: a count small enough for UNITER's 36 × 2048 fp16
    regions (150 kB a file) made the world's 5,000 small images (16 kB) miss on almost every read.
    The file's mtime and size are part of the key, so a rewritten file is read again.
    """

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self.entries: OrderedDict[tuple[Path, int, int], Regions] = OrderedDict()

    def get(self, path: Path) -> Regions:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        regions = self.entries.get(key)
        if regions is not None:
            self.entries.move_to_end(key)
            return regions
        regions = self.entries[key] = read_feature_file(path)
        self.size += _nbytes(regions)
        while self.size > self.limit and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.size -= _nbytes(dropped)
        return regions


def _nbytes(regions: Regions) -> int:
    return sum(array.nbytes for array in regions.values())


#: this process's cache; DataLoader workers share the bound (`vl_prune.data.loader`)
FEATURE_FILES = FeatureCache(limit=1 << 30)
