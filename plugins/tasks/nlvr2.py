"""NLVR2 (Suhr et al., 2019): is a sentence true of a pair of images?

Reads the official release's JSON lines (`train.json`, `dev.json`, `test1.json`: `identifier`
`split-set-pair-sentence`, `sentence`, `label` "True"/"False", …) with images
`<split>-<set>-<pair>-img0/img1` as `images/*.png`, region features `features/*.npz`, a UNITER
img_db (keys `nlvr2_<image>.npz`) or LXMERT's `*obj36.tsv`; or LXMERT's json (a list of
`identifier`, `img0`, `img1`, `label` 0/1, `sent`; splits `train`, `valid`, in the folder or its
`nlvr2/`) with its TSV files; or UNITER's release, `txt_db/nlvr2_<split>.db` with
`img_db/nlvr2_<split>/`; or ViLT's tables, `nlvr2_<split>.arrow` (a row per image pair with its
sentences). The head is UNITER's paired model: the sentence is encoded with each image, and the
two pooled vectors go through an MLP to two classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.data.arrow import ArrowImage, check_column, columns, split_tables
from vl_prune.data.inputs import ImageName, ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import Task, TaskBatch
from vl_prune_plugins.tasks.annotations import (
    annotations,
    field,
    is_json_list,
    json_lines,
    json_records,
)
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs

LABELS = {"False": 0, "True": 1}
#: UNITER's txt_db names (txt_db/nlvr2_<split>.db) and ViLT's tables (nlvr2_<split>.arrow)
TXT_DB = ARROW = "nlvr2"


@dataclass(frozen=True)
class Nlvr2Example:
    identifier: str
    sentence: str | TokenIds
    label: int
    left: ImageName
    right: ImageName


def db_keys(image: str) -> list[str]:
    """UNITER keys NLVR2's region features by the feature file name, nlvr2_<image>.npz."""
    return [f"nlvr2_{image}.npz"]


class PairedHead(nn.Module):
    """UNITER's NLVR2 "paired" head: [pooled(text, left); pooled(text, right)] → MLP → 2."""

    def __init__(self, hidden: int):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(2 * hidden, 2 * hidden),
            nn.GELU(),
            nn.LayerNorm(2 * hidden, eps=1e-12),
            nn.Linear(2 * hidden, 2),
        )

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> torch.Tensor:
        left, right = (backbone(batch).pooled for batch in inputs)
        return self.classifier(torch.cat([left, right], dim=-1))


class Nlvr2(Task):
    """NLVR2: true/false statements about image pairs (paired head, accuracy)."""

    description = "NLVR2: is the sentence true of the image pair? (UNITER's paired head)"
    metric = "accuracy"
    # UNITER's train-nlvr2-base-1gpu.json (its batches are 10,240 tokens, ~32 pairs here).
    recipe: ClassVar[dict] = {
        "steps": 8000,
        "lr": 3e-5,
        "warmup": 0.1,
        "batch_size": 32,
        "seed": 77,
    }

    def default_splits(self) -> tuple[str, str]:
        """`train` and `dev`; LXMERT's json calls the dev split `valid`."""
        folder = annotations(self.data, "nlvr2", "train.json")
        if (folder / "valid.json").is_file() and not (folder / "dev.json").is_file():
            return "train", "valid"
        return super().default_splits()

    def examples(self, split: str) -> list[Nlvr2Example] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split)
        if dbs is not None:
            use_txt_dbs(self, dbs, self._store())
            return TxtDbExamples(dbs, _from_txt_db)
        tables = split_tables(self.data, ARROW, split)
        if tables is not None:
            return [e for path in tables for e in _from_table(path)]
        path = annotations(self.data, "nlvr2", f"{split}.json") / f"{split}.json"
        store = self._store()
        out = []
        for where, example in _lxmert(path) if is_json_list(path) else _official(path):
            for name in (example.left, example.right):
                store.require(name, where)
            out.append(example)
        if not out:
            raise VLPruneError(f"{path}: no examples")
        return out

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        backbone.ensure_image_types(2)
        return PairedHead(backbone.hidden_size)

    def collate(self, examples: list[Nlvr2Example], backbone: Backbone) -> TaskBatch:
        store = self._store()
        texts = [e.sentence for e in examples]
        length = self.text_length
        return TaskBatch(
            [
                encode(texts, [e.left for e in examples], backbone, store, 1, max_length=length),
                encode(texts, [e.right for e in examples], backbone, store, 2, max_length=length),
            ],
            torch.tensor([e.label for e in examples]),
        )

    def _store(self) -> ImageStore:
        return ImageStore(self.data, db_keys)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        return (predictions == targets).float().mean().item()


def _official(path: Path) -> Iterator[tuple[str, Nlvr2Example]]:
    """(where, example) of every line of the release's JSON lines."""
    for where, record in json_lines(path):
        identifier = field(record, "identifier", str, where)
        label = field(record, "label", str, where)
        if label not in LABELS:
            raise VLPruneError(f'{where}: label {label!r} is not "True" or "False"')
        parts = identifier.split("-")
        if len(parts) != 4:
            raise VLPruneError(f"{where}: identifier {identifier!r} is not split-set-pair-sentence")
        pair = "-".join(parts[:3])
        sentence = field(record, "sentence", str, where)
        yield (
            where,
            Nlvr2Example(identifier, sentence, LABELS[label], f"{pair}-img0", f"{pair}-img1"),
        )


def _lxmert(path: Path) -> Iterator[tuple[str, Nlvr2Example]]:
    """(where, example) of LXMERT's NLVR2 json: a list of `identifier`, `img0`, `img1`,
    `label` (0 or 1), `sent`."""
    for where, record in json_records(path):
        label = field(record, "label", int, where)
        if label not in (0, 1):
            raise VLPruneError(f"{where}: label {label!r} is not 0 or 1")
        yield (
            where,
            Nlvr2Example(
                field(record, "identifier", str, where),
                field(record, "sent", str, where),
                label,
                field(record, "img0", str, where),
                field(record, "img1", str, where),
            ),
        )


def _from_table(path: Path) -> list[Nlvr2Example]:
    """The examples of one of ViLT's NLVR2 tables: a row per image pair (`identifier`, its
    `image_0`, `image_1`), with every sentence on it (`questions`, `answers` "True"/"False")."""
    for column in ("image_0", "image_1"):
        check_column(path, column)
    rows = columns(path, {"identifier": "str", "questions": "[str]", "answers": "[str]"})
    out = []
    for row, (pair, sentences, answers) in enumerate(zip(*rows.values(), strict=True)):
        where = f"{path}: row {row} ({pair})"
        if len(sentences) != len(answers) or not set(answers) <= LABELS.keys():
            raise VLPruneError(f"{where}: each sentence needs an answer, True or False")
        left, right = (ArrowImage(path, row, f"image_{k}") for k in (0, 1))
        for k, (sentence, answer) in enumerate(zip(sentences, answers, strict=True)):
            out.append(Nlvr2Example(f"{pair}-{k}", sentence, LABELS[answer], left, right))
    return out


def _from_txt_db(db: TxtDb, key: str, record: dict) -> Nlvr2Example:
    """An example of UNITER's NLVR2 txt_db: `input_ids`, `img_fname` (the pair's img_db keys)
    and `target` (1 if the statement is true)."""
    where = f"{db.path}: key {key!r}"
    label = record.get("target")
    if label not in (0, 1):
        raise VLPruneError(f"{where}: 'target' is {label!r}, not 0 or 1 (an unlabelled split?)")
    left, right = image_names(record, 2, where)
    return Nlvr2Example(key, db.with_specials(record["input_ids"]), label, left, right)
