"""Karpathy's split json (`dataset_<name>.json`: `images[*]` with `filename`, `split`,
`sentences[*].raw`), the caption file of Flickr30k and COCO that NeuralTalk and UNITER read:
one split's images with their captions, checked, and an entry as the file holds it (for
writers of that format); and ViLT's
tables of the same splits (`f30k_caption_karpathy_<split>.arrow`, `coco_caption_karpathy_…`:
a row per image, its `image` bytes and its `caption` list)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vl_prune.data.arrow import ArrowImage, check_column, columns, split_tables, table_splits
from vl_prune.data.inputs import ImageStore
from vl_prune.errors import VLPruneError
from vl_prune_plugins.tasks.annotations import field, json_file


@dataclass(frozen=True)
class KarpathyImage:
    stem: str  # the filename's stem: images/<stem>.png, features/<stem>.npz
    captions: tuple[str, ...]


def dataset_file(data: Path) -> Path:
    """The folder's one `dataset_<name>.json`."""
    files = sorted(data.glob("dataset_*.json"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise VLPruneError(
            f"{data}: expected one Karpathy split file dataset_<name>.json, found {found}"
        )
    return files[0]


def db_keys(stem: str) -> list[str]:
    """UNITER's img_db key of a Karpathy image: Flickr30k's `1000092795.jpg` is
    `flickr30k_001000092795.npz`, COCO's `COCO_val2014_000000391895.jpg`
    `coco_val2014_000000391895.npz`."""
    if stem.isdigit():
        return [f"flickr30k_{int(stem):012}.npz"]
    return [f"{stem.lower()}.npz"] if stem.startswith("COCO_") else []


def split_names(data: Path) -> set[str]:
    """The splits the folder's Karpathy file has (train, val, test, restval)."""
    path = dataset_file(data)
    return {
        field(record, "split", str, f"{path}: images[{i}]")
        for i, record in enumerate(_images(path))
    }


def read_split(data: Path, split: str, reads: tuple[str, ...] = ()) -> list[KarpathyImage]:
    """The images of `split` (or of the Karpathy splits `reads`, e.g. train and restval) in file
    order, each listed once, present in the folder, with non-empty captions."""
    path = dataset_file(data)
    wanted = reads or (split,)
    store = ImageStore(data, db_keys)
    images: list[KarpathyImage] = []
    seen: set[str] = set()
    for i, record in enumerate(_images(path)):
        where = f"{path}: images[{i}]"
        if field(record, "split", str, where) not in wanted:
            continue
        filename = field(record, "filename", str, where)
        where = f"{where} ({filename})"
        stem = Path(filename).stem
        if stem in seen:
            raise VLPruneError(f"{where}: image {stem} is listed twice in split {split!r}")
        store.require(stem, where)
        captions = []
        for j, sentence in enumerate(field(record, "sentences", list, where)):
            raw = field(sentence, "raw", str, f"{where}: sentences[{j}]")
            if not raw.strip():
                raise VLPruneError(f"{where}: sentences[{j}]: the caption is empty")
            captions.append(raw)
        images.append(KarpathyImage(stem, tuple(captions)))
        seen.add(stem)
    if not any(image.captions for image in images):
        raise VLPruneError(f"{path}: no captions in split {split!r}")
    return images


def _images(path: Path) -> list[Any]:
    """The file's `images` list, read once per process (COCO's file is 150 MB)."""
    stat = path.stat()
    return _read_images(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1)
def _read_images(path: Path, mtime: int, size: int) -> list[Any]:
    content = json_file(path)
    if not isinstance(content, dict):
        raise VLPruneError(f"{path}: expected a JSON object with 'images'")
    return field(content, "images", list, str(path))


def caption_tables(data: Path, prefixes: tuple[str, ...], split: str) -> list[Path] | None:
    """ViLT's caption tables of `split` under the first of `prefixes` the folder has; `train`
    takes Karpathy's `restval` too where there is one, as the split json does."""
    for prefix in prefixes:
        if splits := table_splits(data, prefix):
            if split == "train" and "restval" in splits:
                split = "train+restval"
            return split_tables(data, prefix, split)
    return None


def table_images(paths: list[Path]) -> list[tuple[ArrowImage, tuple[str, ...]]]:
    """(image, its captions) of every row of ViLT's caption tables, in order."""
    out = []
    for path in paths:
        check_column(path, "image")
        for row, captions in enumerate(columns(path, {"caption": "[str]"})["caption"]):
            if not captions or not all(c.strip() for c in captions):
                raise VLPruneError(f"{path}: row {row}: column 'caption' needs captions")
            out.append((ArrowImage(path, row, "image"), tuple(captions)))
    if not out:
        raise VLPruneError(f"{paths[0]}: no rows")
    return out


def karpathy_image(
    imgid: int, first_sentid: int, split: str, filename: str, captions: list[tuple[str, list[str]]]
) -> dict[str, Any]:
    """One `images` entry of a Karpathy split json, its sentences numbered from
    `first_sentid`; `captions` are (raw, tokens) pairs."""
    sentences = [
        {"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": first_sentid + k}
        for k, (raw, tokens) in enumerate(captions)
    ]
    return {
        "sentids": [s["sentid"] for s in sentences],
        "imgid": imgid,
        "sentences": sentences,
        "split": split,
        "filename": filename,
    }
