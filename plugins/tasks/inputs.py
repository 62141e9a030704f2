"""Turning texts and image names into a VLBatch for a backbone: tokens, and region features or
pixels read from a data folder (`features/<name>.npz`, `images/<name>.png`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.errors import VLPruneError

MAX_TEXT = 40


class ImageStore:
    """The images of a data folder, as region features or as pictures."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def regions(self, name: str) -> dict[str, np.ndarray]:
        """`features` (N × D) and `norm_bb` (N × 6) of one image, UNITER's npz layout."""
        path = self.root / "features" / f"{name}.npz"
        if not path.is_file():
            raise VLPruneError(f"{path}: region features of image {name!r} are missing")
        try:
            with np.load(path) as npz:
                return {"features": npz["features"], "norm_bb": npz["norm_bb"]}
        except (OSError, ValueError, KeyError) as exc:
            raise VLPruneError(f"{path}: not a region feature file ({exc})") from exc

    def picture(self, name: str) -> Image.Image:
        path = self.root / "images" / f"{name}.png"
        if not path.is_file():
            raise VLPruneError(f"{path}: image {name!r} is missing")
        with Image.open(path) as image:
            return image.convert("RGB")


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
        width = max(len(r["features"]) for r in regions)
        feats = torch.zeros(
            len(images), width, regions[0]["features"].shape[1], dtype=torch.float16
        )
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
