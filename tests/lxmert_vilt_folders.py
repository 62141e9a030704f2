"""Small data folders in LXMERT's and ViLT's released layouts, written as their own scripts
write them: LXMERT's `*_obj36.tsv` feature files (`data/mscoco_imgfeat/extract_coco_image.py`: a
csv.DictWriter line of ten tab-separated fields, arrays base64 of their bytes) with its
annotation json (`src/tasks/*_data.py` docstrings), and ViLT's Arrow IPC tables
(`vilt/utils/write_nlvr2.py`, `write_vqa.py`, `write_f30k_karpathy.py`)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

FIELDS = [
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
]
BOXES = 36


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))


def tsv_row(image: str, img_dim: int) -> dict[str, object]:
    """One image's line as LXMERT's extractor writes it: 36 boxes in pixels, float32 features."""
    rng = _rng(image)
    width, height = int(rng.integers(320, 640)), int(rng.integers(240, 480))
    x1, y1 = rng.uniform(0, width - 20, BOXES), rng.uniform(0, height - 20, BOXES)
    x2, y2 = rng.uniform(x1 + 10, width), rng.uniform(y1 + 10, height)
    arrays = {
        "objects_id": rng.integers(0, 1600, BOXES).astype(np.int64),
        "objects_conf": rng.uniform(0.2, 1.0, BOXES).astype(np.float32),
        "attrs_id": rng.integers(0, 400, BOXES).astype(np.int64),
        "attrs_conf": rng.uniform(0.0, 1.0, BOXES).astype(np.float32),
        "boxes": np.stack([x1, y1, x2, y2], 1).astype(np.float32),
        "features": rng.gamma(0.6, 1.0, (BOXES, img_dim)).astype(np.float32),
    }
    row: dict[str, object] = {"img_id": image, "img_h": height, "img_w": width}
    row["num_boxes"] = BOXES
    row.update({k: base64.b64encode(v.tobytes()).decode("ascii") for k, v in arrays.items()})
    return row


def write_tsv(path: Path, images: list[str], img_dim: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS, delimiter="\t")
        for image in images:
            writer.writerow(tsv_row(image, img_dim))
    return path


def _json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4, sort_keys=True))


ANSWERS = ("yes", "no", "2")


def lxmert_vqa(root: Path, img_dim: int = 64) -> Path:
    """LXMERT's `data/`: `vqa/{train,nominival,minival}.json`, `vqa/trainval_ans2label.json`,
    `mscoco_imgfeat/{train2014,val2014}_obj36.tsv`."""
    for split, subtype, first in (("train", "train2014", 1), ("minival", "val2014", 500)):
        images = [f"COCO_{subtype}_{first + i:012d}" for i in range(4)]
        write_tsv(root / "mscoco_imgfeat" / f"{subtype}_obj36.tsv", images, img_dim)
        records = [
            {
                "answer_type": "other",
                "img_id": images[i % 4],
                "label": {ANSWERS[i % 3]: 1.0, ANSWERS[(i + 1) % 3]: 0.3},
                "question_id": (first + i % 4) * 1000 + i // 4,
                "question_type": "is it",
                "sent": "Is it sunny?",
            }
            for i in range(8)
        ]
        _json(root / "vqa" / f"{split}.json", records)
    _json(root / "vqa" / "trainval_ans2label.json", {a: i for i, a in enumerate(ANSWERS)})
    return root


def lxmert_nlvr2(root: Path, img_dim: int = 64) -> Path:
    """LXMERT's `data/`: `nlvr2/{train,valid}.json`, `nlvr2_imgfeat/{train,valid}_obj36.tsv`."""
    for split, prefix in (("train", "train"), ("valid", "dev")):
        pairs = [f"{prefix}-{i}-0" for i in range(4)]
        images = [f"{pair}-img{k}" for pair in pairs for k in (0, 1)]
        write_tsv(root / "nlvr2_imgfeat" / f"{split}_obj36.tsv", images, img_dim)
        records = [
            {
                "identifier": f"{pair}-{k}",
                "img0": f"{pair}-img0",
                "img1": f"{pair}-img1",
                "label": (i + k) % 2,
                "sent": "There are two dogs.",
                "uid": f"nlvr2_{split}_{2 * i + k}",
            }
            for i, pair in enumerate(pairs)
            for k in (0, 1)
        ]
        _json(root / "nlvr2" / f"{split}.json", records)
    return root


def png(name: str, size: tuple[int, int] = (64, 64)) -> bytes:
    colour = tuple(int(c) for c in _rng(name).integers(0, 255, 3))
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def write_table(path: Path, columns: dict[str, list]) -> Path:
    """An Arrow IPC file of one table, as ViLT's writers leave it."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def vilt_nlvr2(root: Path) -> Path:
    """`nlvr2_train.arrow`, `nlvr2_dev.arrow`: a row per image pair with its sentences."""
    for split in ("train", "dev"):
        pairs = [f"{split}-{i}-0" for i in range(4)]
        write_table(
            root / f"nlvr2_{split}.arrow",
            {
                "image_0": [png(f"{p}-img0") for p in pairs],
                "image_1": [png(f"{p}-img1") for p in pairs],
                "questions": [["There are two dogs.", "One image is red."] for _ in pairs],
                "answers": [["True", "False"] if i % 2 else ["False", "True"] for i in range(4)],
                "identifier": pairs,
            },
        )
    return root


def vilt_vqa(root: Path) -> Path:
    """`vqav2_{train,trainable_val,rest_val}.arrow`: a row per image with its questions."""
    for split, first in (("train", 1), ("trainable_val", 100), ("rest_val", 200)):
        ids = [first + i for i in range(3)]
        write_table(
            root / f"vqav2_{split}.arrow",
            {
                "image": [png(f"vqa-{i}") for i in ids],
                "questions": [["Is it sunny?", "How many?"] for _ in ids],
                "answers": [[["yes"], ["2", "no"]] for _ in ids],
                "answer_labels": [[[0], [2, 1]] for _ in ids],
                "answer_scores": [[[1.0], [0.9, 0.3]] for _ in ids],
                "image_id": ids,
                "question_id": [[i * 1000, i * 1000 + 1] for i in ids],
                "split": [split] * len(ids),
            },
        )
    return root


def vilt_karpathy(root: Path, dataset: str = "f30k") -> Path:
    """`<dataset>_caption_karpathy_{train,val}.arrow`: a row per image with its captions."""
    for split, first in (("train", 1000), ("val", 2000)):
        names = [f"{first + i}.jpg" for i in range(4)]
        write_table(
            root / f"{dataset}_caption_karpathy_{split}.arrow",
            {
                "image": [png(name) for name in names],
                "caption": [[f"A thing number {n} and {k}." for k in range(5)] for n in names],
                "image_id": names,
                "split": [split] * len(names),
            },
        )
    return root
