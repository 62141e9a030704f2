"""SNLI-VE (Xie et al., 2019): does an image entail, contradict, or leave open a hypothesis?

Reads the release's JSON lines `snli_ve_<split>.jsonl` (`train`, `dev`, `test`): the image is
`Flikr30kID` (so spelt, "<id>.jpg") or `Flickr30K_ID` (other copies, with or without ".jpg"),
the hypothesis `sentence2`, the label `gold_label`, the id `pairID`; the caption `sentence1`
(the SNLI premise the image replaces) is not read. Lines whose `gold_label` is "-" (annotators
reached no majority: SNLI keeps them, XVNLI's test has some) are skipped, as SNLI's own
evaluation skips them: they have no answer to score. Images are `images/<id>.png`, region
features `features/<id>.npz` (the id without ".jpg") or a UNITER img_db (keys
`flickr30k_<id:012>.npz`). Or UNITER's release: `txt_db/ve_<split>.db` with `img_db/flickr30k/`;
its unlabelled lines are kept there, and left out of the loss and the accuracy. The head is
UNITER's VE head (its VQA head with three answers), trained with cross-entropy; the metric is
accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone
from vl_prune.data.inputs import ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import Task, TaskBatch
from vl_prune_plugins.tasks.annotations import field, json_lines
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs
from vl_prune_plugins.tasks.vqa import VqaHead

LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
#: the labels of UNITER's VE txt_db targets (its VE_ENT2IDX), and its db names: ve_<split>.db
TXT_DB_LABELS = ("contradiction", "entailment", "neutral")
TXT_DB = "ve"
NO_CONSENSUS = "-"
IGNORE = -100  # the target of a line without a label: no loss, not scored
IMAGE_FIELDS = ("Flikr30kID", "Flickr30K_ID")


@dataclass(frozen=True)
class SnliVeExample:
    pair_id: str
    hypothesis: str | TokenIds
    image: str
    label: int


def db_keys(image: str) -> list[str]:
    """UNITER's img_db key of a Flickr30k image: `flickr30k_000555378351.npz`."""
    return [f"flickr30k_{int(image):012}.npz"] if image.isdigit() else []


class SnliVe(Task):
    """SNLI-VE: entailment, neutral or contradiction of a hypothesis by an image (accuracy)."""

    description = "SNLI-VE: does the image entail the hypothesis? (UNITER's VE head, 3-way)"
    metric = "accuracy"
    # UNITER's train-ve-base-2gpu.json: 4000 steps, peak lr 8e-5, 400 warmup steps, seed 42.
    recipe: ClassVar[dict] = {
        "steps": 4000,
        "lr": 8e-5,
        "warmup": 0.1,
        "batch_size": 32,
        "seed": 42,
    }

    def examples(self, split: str) -> list[SnliVeExample] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split)
        if dbs is not None:
            use_txt_dbs(self, dbs, ImageStore(self.data, db_keys))
            return TxtDbExamples(dbs, _from_txt_db)
        path = self.data / f"snli_ve_{split}.jsonl"
        store = ImageStore(self.data, db_keys)
        out = []
        for where, record in json_lines(path):
            gold = field(record, "gold_label", str, where)
            if gold == NO_CONSENSUS:
                continue
            if gold not in LABELS:
                known = ", ".join(LABELS)
                raise VLPruneError(f"{where}: gold_label {gold!r} is not one of {known} or '-'")
            image = _image(record, where)
            store.require(image, where)
            pair_id = field(record, "pairID", str, where)
            hypothesis = field(record, "sentence2", str, where)
            out.append(SnliVeExample(pair_id, hypothesis, image, LABELS[gold]))
        if not out:
            raise VLPruneError(f"{path}: no labelled hypotheses")
        return out

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return VqaHead(backbone.hidden_size, len(LABELS))

    def collate(self, examples: list[SnliVeExample], backbone: Backbone) -> TaskBatch:
        batch = encode(
            [e.hypothesis for e in examples],
            [e.image for e in examples],
            backbone,
            ImageStore(self.data, db_keys),
            max_length=self.text_length,
        )
        return TaskBatch([batch], torch.tensor([e.label for e in examples]))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # A batch of nothing but unlabelled examples has no loss (cross-entropy's mean is NaN).
        return nn.functional.cross_entropy(
            logits, targets, ignore_index=IGNORE, reduction="sum"
        ) / (targets != IGNORE).sum().clamp(min=1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        labelled = targets != IGNORE
        return (predictions[labelled] == targets[labelled]).float().mean().nan_to_num(0.0).item()


def _from_txt_db(db: TxtDb, key: str, record: dict) -> SnliVeExample:
    """A hypothesis of UNITER's VE txt_db: `input_ids`, `img_fname` and `target`, whose one
    label (of three, in UNITER's order) scores 1; none for a line without consensus."""
    where = f"{db.path}: key {key!r}"
    target = record.get("target")
    labels = target.get("labels") if isinstance(target, dict) else None
    if not isinstance(labels, list) or len(labels) > 1 or not all(x in (0, 1, 2) for x in labels):
        raise VLPruneError(f"{where}: 'target' should give at most one label of 0, 1, 2")
    label = LABELS[TXT_DB_LABELS[labels[0]]] if labels else IGNORE
    (image,) = image_names(record, 1, where)
    return SnliVeExample(key, db.with_specials(record["input_ids"]), image, label)


def _image(record: dict, where: str) -> str:
    """The Flickr30k id of a line, without ".jpg", from whichever image field it has."""
    for name in IMAGE_FIELDS:
        if name in record:
            return field(record, name, str, where).removesuffix(".jpg")
    raise VLPruneError(f"{where}: field {IMAGE_FIELDS[0]!r} (or {IMAGE_FIELDS[1]!r}) is missing")
