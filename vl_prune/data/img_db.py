"""UNITER's img_db: region features of many images in LMDB, in every layout its
`DetectFeatLmdb` reads.

`img_db/` holds one folder per image split (`nlvr2_dev/`, `coco_val2014/`, `vcr_gt_val/`, …),
each with the LMDB folders `scripts/convert_imgdir.py` writes:

- `feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]/` with `nbb_th…_max…_min….json`
  beside it: each image's first nbb regions (the box-count rule applied at conversion);
- `feat_numbb{N}[_compressed]/`: a fixed N regions (UNITER's ground-truth boxes of VCR and
  RefCOCO, `conf_th` -1);
- `all[_compressed]/`: every region; nbb is computed from `conf` by the rule.

Values are msgpack-numpy maps, or npz bytes in the `_compressed` folders (decoded without
unpickling: `vl_prune.data.codecs`). Keys are feature file names (`nlvr2_dev-850-0-img0.npz`,
`coco_val2014_000000131089.npz`). Where a split folder holds several
LMDB folders, the one UNITER's training scripts open by default is read: `feat_th0.2_max100_min10`
(msgpack) before its `_compressed` twin, then `all`, then ground-truth `feat_numbb`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from vl_prune.data.codecs import BadValue, decode_arrays
from vl_prune.data.lmdb_files import read, stored_keys
from vl_prune.data.regions import UNITER_RULE, RegionRule, Regions, checked, cut
from vl_prune.data.text import read_json
from vl_prune.errors import VLPruneError

LAYOUT = re.compile(
    r"(?:feat_th(?P<th>[0-9.]+)_max(?P<max>\d+)_min(?P<min>\d+)|feat_numbb(?P<fixed>\d+)|all)"
    r"(?P<compressed>_compressed)?"
)
KEYS = "__keys__"


@dataclass(frozen=True)
class Database:
    """One LMDB folder of an image split and how many regions of an image it gives."""

    path: Path

    @cached_property
    def _layout(self) -> re.Match:
        return LAYOUT.fullmatch(self.path.name)

    @property
    def fixed(self) -> int | None:
        """N of a `feat_numbb{N}` folder."""
        return int(self._layout["fixed"]) if self._layout["fixed"] else None

    @property
    def rule(self) -> RegionRule:
        """The box-count rule the folder was cut by (the default rule for `all`)."""
        if self._layout["th"] is None:
            return UNITER_RULE
        return RegionRule(
            float(self._layout["th"]), int(self._layout["max"]), int(self._layout["min"])
        )

    @cached_property
    def counts(self) -> dict[str, int] | None:
        """The per-image box counts convert_imgdir.py wrote beside a `feat_th…` folder."""
        if self._layout["th"] is None:
            return None
        # Named as the folder is (UNITER writes both from the same settings).
        layout = self.path.name.removeprefix("feat_").removesuffix("_compressed")
        path = self.path.parent / f"nbb_{layout}.json"
        if not path.is_file():
            return None
        counts = read_json(path)
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and n >= 0 for n in counts.values()
        ):
            raise VLPruneError(f"{path}: expected {{feature file name: box count}}")
        return counts

    @cached_property
    def keys(self) -> frozenset[str]:
        """The feature file names stored: one pass over the database's keys, no values read
        (`__keys__`, UNITER's own list, is left out)."""
        return frozenset(key for key in stored_keys(self.path) if key != KEYS)

    def regions(self, key: str) -> Regions:
        where = f"{self.path}: key {key!r}"
        raw = read(self.path, key)
        if raw is None:
            raise VLPruneError(f"{where}: not stored")
        try:
            regions = checked(decode_arrays(raw), where)
        except BadValue as exc:
            raise VLPruneError(f"{where}: {exc}") from exc
        return cut(regions, self.count(key, regions))

    def count(self, key: str, regions: Regions) -> int:
        """nbb as DetectFeatLmdb finds it: fixed, stored in the nbb json, or from `conf`."""
        if self.fixed is not None:
            return self.fixed
        if self.counts is not None and key in self.counts:
            return self.counts[key]
        if "conf" not in regions:
            raise VLPruneError(
                f"{self.path}: key {key!r} has no 'conf' and the folder no nbb json: "
                "the number of boxes to keep is unknown"
            )
        return self.rule.count(regions["conf"])


def _preference(name: str) -> tuple:
    """Which LMDB folder of a split to read: UNITER's default rule first, msgpack before npz."""
    match = LAYOUT.fullmatch(name)
    compressed = match["compressed"] is not None
    if match["th"] is not None:
        default = name.removesuffix("_compressed") == f"feat_{UNITER_RULE.name}"
        return (0 if default else 3, compressed, name)
    if match["fixed"] is None:
        return (1, compressed, name)
    return (2, compressed, name)


class ImgDb:
    """Every image split under an `img_db/` folder (or one split folder), looked up by key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        splits = [self.folder, *sorted(p for p in self.folder.iterdir() if p.is_dir())]
        self.databases: list[Database] = []
        for split in splits:
            names = [p.name for p in split.iterdir() if p.is_dir() and LAYOUT.fullmatch(p.name)]
            if names:
                self.databases.append(Database(split / min(names, key=_preference)))
        if not self.databases:
            raise VLPruneError(
                f"{self.folder}: no UNITER img_db folder (feat_th*_max*_min*, feat_numbb*, "
                "all, each optionally _compressed) in it or its split folders"
            )

    @cached_property
    def _owner(self) -> dict[str, Database]:
        owner: dict[str, Database] = {}
        for database in self.databases:
            for key in database.keys:
                owner.setdefault(key, database)
        return owner

    def find(self, keys: list[str]) -> str | None:
        """The first of `keys` that some split stores."""
        return next((key for key in keys if key in self._owner), None)

    def regions(self, key: str) -> Regions:
        if key not in self._owner:
            raise VLPruneError(f"{self.folder}: no image {key!r} in any split")
        return self._owner[key].regions(key)


_OPENED: dict[Path, ImgDb] = {}


def open_img_db(folder: Path) -> ImgDb:
    """The img_db under `folder`, indexed once per process (tasks ask for it per batch)."""
    folder = Path(folder)
    if folder not in _OPENED:
        _OPENED[folder] = ImgDb(folder)
    return _OPENED[folder]
