"""RefCOCO+ (Yu et al., 2016): which object of the image does a referring expression mean?

Reads the refer toolkit's layout (lichengunc/refer): `refcoco+/instances.json` (COCO-style
`images` {id, file_name, width, height}, `annotations` {id, image_id, bbox [x, y, w, h], …},
`categories`) and `refcoco+/refs(unc).p`, a pickle of the refs {ref_id, ann_id, image_id, split
"train"/"val"/"testA"/"testB", sentences [{sent, raw, tokens, sent_id}], …}, or the same list as
`refs(unc).json`. The pickle is read by an unpickler that refuses every class and function, so a
malicious file cannot run code. Region features are `features/<file_name stem>.npz` beside
`refcoco+/`, or UNITER's img_dbs under `img_db/`: `re_coco_gt/` (keys
`visual_grounding_coco_gt_<image_id:012>.npz`, the annotated boxes, which the training split
reads) and `re_coco_det/` (`visual_grounding_det_coco_…`, detected boxes, which the other splits
read first, as UNITER scores them). Or UNITER's release as it is: `txt_db/re/refcoco+_<split>.db`
(each sentence's `input_ids`, `image_id` and `bbox`, with `images.json` giving image sizes) and
those img_dbs. Each sentence is one example.

The head is UNITER's RE head: every region's state through an MLP to one score, padded regions
masked out, cross-entropy towards the region that overlaps the referred box most. A prediction
is right when its region's box has IoU ≥ 0.5 with the referred box (regions come from a
detector on real data; in the world they are the objects, so the rule gives exact matches).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.data.inputs import ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import Task, TaskBatch, symmetric_kl
from vl_prune_plugins.tasks.annotations import field, json_file, load_plain_pickle
from vl_prune_plugins.tasks.uniter_dbs import record_vocabulary

FOLDER = "refcoco+"
#: UNITER's txt_db names: txt_db/re/refcoco+_<split>.db
TXT_DB = "refcoco+"
INSTANCES = "instances.json"
REFS_PICKLE = "refs(unc).p"
REFS_JSON = "refs(unc).json"
#: the overlap with the referred box that makes a predicted region right (the standard rule)
IOU_THRESHOLD = 0.5
# UNITER masks the scores of padded regions with this (not -inf: fp16, and the KL term).
MASKED = -1e4


@dataclass(frozen=True)
class RefExample:
    sent_id: int
    ref_id: int
    sentence: str | TokenIds
    image: str
    #: the referred object's box x1, y1, x2, y2, normalised by the image's size like `norm_bb`
    box: tuple[float, float, float, float]


class ReHead(nn.Module):
    """UNITER's RE head (mlp 2): region state → Linear(H, H) → GELU → LayerNorm → Linear(H, 1).

    Its outputs are the scores and the regions' boxes, so that a prediction is a box."""

    def __init__(self, hidden: int):
        super().__init__()
        self.scorer = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=1e-12),
            nn.Linear(hidden, 1),
        )

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> dict[str, torch.Tensor]:
        (batch,) = inputs
        scores = self.scorer(backbone(batch).image_states).squeeze(-1)
        return {
            "scores": scores.masked_fill(batch.region_mask == 0, MASKED),
            "boxes": batch.region_boxes[..., :4],
        }


class RefcocoPlus(Task):
    """RefCOCO+: pick the region a referring expression means (UNITER's RE head, accuracy)."""

    description = "RefCOCO+: which region does the expression refer to? (UNITER's RE head)"
    metric = "accuracy"
    # Regions are what the head chooses between; pixel backbones have none.
    image_inputs = ("regions",)
    splits = ("train", "val", "testA", "testB")
    # UNITER's train-refcoco+-base-1gpu.json: 10000 steps, lr 6e-5, 1000 warmup, 128 a batch.
    recipe: ClassVar[dict] = {
        "steps": 10000,
        "lr": 6e-5,
        "warmup": 0.1,
        "batch_size": 128,
        "seed": 24,
    }

    def examples(self, split: str) -> list[RefExample] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split)
        if dbs is not None:
            return self._from_txt_dbs(dbs, split)
        folder = self.data / FOLDER
        refs_path, refs = read_refs(folder)
        instances = _Instances(folder / INSTANCES)
        store = self._store(split)
        out, seen_splits = [], set()
        for i, ref in enumerate(refs):
            where = f"{refs_path}: refs[{i}]"
            ref_id = field(ref, "ref_id", int, where)
            where = f"{where} (ref_id {ref_id})"
            ref_split = field(ref, "split", str, where)
            seen_splits.add(ref_split)
            if ref_split != split:
                continue
            image_id = field(ref, "image_id", int, where)
            ann_id = field(ref, "ann_id", int, where)
            name, box = instances.referred(ann_id, image_id, where)
            name = store.resolve(name, where)
            sentences = field(ref, "sentences", list, where)
            if not sentences:
                raise VLPruneError(f"{where}: no sentences")
            for j, sentence in enumerate(sentences):
                at = f"{where}: sentences[{j}]"
                text = field(sentence, "sent", str, at)
                out.append(RefExample(field(sentence, "sent_id", int, at), ref_id, text, name, box))
        if not out:
            raise VLPruneError(
                f"{refs_path}: no refs of split {split!r} (it has {sorted(seen_splits)})"
            )
        return out

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return ReHead(backbone.hidden_size)

    def collate(self, examples: list[RefExample], backbone: Backbone) -> TaskBatch:
        self.check_backbone(backbone)
        batch = encode(
            [e.sentence for e in examples],
            [e.image for e in examples],
            backbone,
            ImageStore(self.data),
            max_length=self.text_length,
        )
        boxes = torch.tensor([e.box for e in examples])
        overlap = iou(batch.region_boxes[..., :4], boxes[:, None])
        overlap = overlap.masked_fill(batch.region_mask == 0, -1.0)
        return TaskBatch([batch], {"region": overlap.argmax(1), "box": boxes})

    def _store(self, split: str) -> ImageStore:
        """Images by their COCO file names, found in UNITER's img_dbs as it reads them: the
        annotated boxes to train, the detected ones to score."""
        kinds = ("coco_gt", "det_coco") if split == self.train_split else ("det_coco", "coco_gt")

        def keys(name: str) -> list[str]:
            image_id = name.rsplit("_", 1)[-1]
            if not image_id.isdigit():
                return []
            return [f"visual_grounding_{kind}_{int(image_id):012}.npz" for kind in kinds]

        return ImageStore(self.data, keys)

    def _from_txt_dbs(self, dbs: list[TxtDb], split: str) -> TxtDbExamples:
        """The sentences of UNITER's RE txt_dbs, each image's features checked up front."""
        store = self._store(split)
        record_vocabulary(self, dbs)
        images = {}
        for db in dbs:
            db.check()
            for i, image in enumerate(db.json("images.json")):
                where = f"{db.path / 'images.json'}[{i}]"
                image_id = field(image, "id", int, where)
                found = store.resolve(f"COCO_train2014_{image_id:012}", where)
                width = _positive(image, "width", where)
                images[image_id] = found, (width, _positive(image, "height", where))
        return TxtDbExamples(dbs, partial(_from_txt_db, images))

    def loss(self, outputs: dict[str, torch.Tensor], targets: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs["scores"], targets["region"])

    def predict(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The box of the best-scoring region of each example (B × 4)."""
        chosen = outputs["scores"].argmax(-1)
        rows = torch.arange(len(chosen), device=chosen.device)
        return outputs["boxes"][rows, chosen].float()

    def score(self, predictions: torch.Tensor, targets: dict) -> float:
        return accuracy(predictions, targets["box"])

    def consistency(self, clean: dict, perturbed: dict) -> torch.Tensor:
        """The symmetric KL of the region choice (boxes are inputs, not predictions)."""
        return symmetric_kl(clean["scores"], perturbed["scores"])


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of x1, y1, x2, y2 boxes (last dimension), broadcast over the
    others. It does not change when x and y are scaled, so normalised boxes give the IoU of
    the boxes in pixels."""
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp_min(1e-12)


def accuracy(predicted: torch.Tensor, referred: torch.Tensor) -> float:
    """The share of predicted boxes with IoU ≥ 0.5 with the referred box (B × 4 each)."""
    return (iou(predicted.float(), referred.float()) >= IOU_THRESHOLD).float().mean().item()


def read_refs(folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The refs list, from `refs(unc).p` or else `refs(unc).json`, and the file it came from."""
    pickled, plain = folder / REFS_PICKLE, folder / REFS_JSON
    if pickled.is_file():
        path = pickled
        with path.open("rb") as file:
            refs = load_plain_pickle(file, path)
    elif plain.is_file():
        path, refs = plain, json_file(plain)
    else:
        raise VLPruneError(f"{folder}: no {REFS_PICKLE} or {REFS_JSON} (the refer toolkit's refs)")
    if not isinstance(refs, list):
        raise VLPruneError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return path, refs


class _Instances:
    """instances.json, indexed by image and annotation id; records are checked when used."""

    def __init__(self, path: Path):
        content = json_file(path)
        if not isinstance(content, dict):
            raise VLPruneError(f"{path}: expected a JSON object with 'images' and 'annotations'")
        self.path = path
        self.images = self._index(content, "images")
        self.annotations = self._index(content, "annotations")

    def _index(self, content: dict, key: str) -> dict[int, tuple[str, dict]]:
        """id → (where the record is, the record)."""
        out = {}
        for i, record in enumerate(field(content, key, list, str(self.path))):
            where = f"{self.path}: {key}[{i}]"
            record_id = field(record, "id", int, where)
            if record_id in out:
                raise VLPruneError(f"{where}: id {record_id} appears twice")
            out[record_id] = f"{where} (id {record_id})", record
        return out

    def referred(self, ann_id: int, image_id: int, ref: str) -> tuple[str, tuple[float, ...]]:
        """The image name (file name without extension) and the normalised x1, y1, x2, y2 box
        of the annotation a ref points at."""
        if ann_id not in self.annotations:
            raise VLPruneError(f"{ref}: ann_id {ann_id} is not in {self.path}")
        where, annotation = self.annotations[ann_id]
        if field(annotation, "image_id", int, where) != image_id:
            raise VLPruneError(
                f"{ref}: image_id {image_id}, but {where} is on image {annotation['image_id']}"
            )
        if image_id not in self.images:
            raise VLPruneError(f"{ref}: image_id {image_id} is not in {self.path}")
        image_where, image = self.images[image_id]
        name = Path(field(image, "file_name", str, image_where)).stem
        width = _positive(image, "width", image_where)
        height = _positive(image, "height", image_where)
        bbox = field(annotation, "bbox", list, where)
        if len(bbox) != 4 or not all(_number(v) for v in bbox) or min(bbox[2:]) <= 0:
            raise VLPruneError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        x, y, w, h = bbox
        return name, (x / width, y / height, (x + w) / width, (y + h) / height)


def _from_txt_db(
    images: dict[int, tuple[str, tuple[int, int]]], db: TxtDb, key: str, record: dict
) -> RefExample:
    """A sentence of UNITER's RE txt_db: `input_ids`, `ref_id`, `image_id` and the referred
    object's `bbox` (x, y, width, height in pixels of the image whose size `images.json`
    gives); `images` maps image ids to the name their features are read under and the size."""
    where = f"{db.path}: key {key!r}"
    image_id = field(record, "image_id", int, where)
    if image_id not in images:
        raise VLPruneError(f"{where}: image_id {image_id} is not in images.json")
    bbox = field(record, "bbox", list, where)
    if len(bbox) != 4 or not all(_number(v) for v in bbox) or min(bbox[2:]) <= 0:
        raise VLPruneError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
    (name, (width, height)), (x, y, w, h) = images[image_id], bbox
    return RefExample(
        field(record, "sent_id", int, where),
        field(record, "ref_id", int, where),
        db.with_specials(record["input_ids"]),
        name,
        (x / width, y / height, (x + w) / width, (y + h) / height),
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(record: dict, name: str, where: str) -> float:
    value = field(record, name, int, where)
    if value <= 0:
        raise VLPruneError(f"{where}: field {name!r} should be positive, got {value}")
    return value
