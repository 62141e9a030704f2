"""Count: yes/no questions on how many objects an image holds ("are there three shapes ?").

The README's example of a task plugin ("Writing a task plugin"): its reader, head, loss and
metric use nothing but the public contract, and it collates through the public input helpers of
`vl_prune.data.inputs`. A data folder holds `count_<split>.json`
(`{"questions": [{"question_id", "image_id", "question", "answer": "yes"|"no"}]}`) and each
image in any layout `ImageStore` reads: region features `features/<image_id>.npz` (UNITER's npz
layout), a UNITER img_db or LXMERT's TSV files, and/or a picture `images/<image_id>.png`. Its
split of the embedded world is in `vlprune_example_task.world`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, Inputs, VLBatch
from vl_prune.data.inputs import ImageStore, encode
from vl_prune.errors import VLPruneError
from vl_prune.task import DataOptions, Task, TaskBatch

ANSWERS = {"no": 0, "yes": 1}
FIELDS = ("image_id", "question", "answer")


@dataclass(frozen=True)
class Question:
    image: str
    text: str
    label: int


class YesNoHead(nn.Module):
    """An MLP over the pooled vector: logits of no and yes."""

    def __init__(self, hidden: int):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> torch.Tensor:
        return self.classifier(backbone(inputs[0]).pooled)


class Count(Task):
    """Is the number of objects the question names right? (yes/no, accuracy)"""

    description = "Count: is the number of objects the question names right? (yes/no)"
    metric = "accuracy"
    image_inputs = ("regions", "pixels")
    splits = ("train", "dev")  # trains on the first, scores on the second
    max_text_len = 16
    recipe: ClassVar[dict[str, Any]] = {"steps": 2000, "lr": 5e-5, "batch_size": 32}

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        super().__init__(data, options)
        self.images = ImageStore(self.data)  # reads nothing until an image is asked for

    def examples(self, split: str) -> list[Question]:
        path = self.data / f"count_{split}.json"
        try:
            records = list(json.loads(path.read_text())["questions"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VLPruneError(f"{path}: not a Count annotation file ({exc!r})") from exc
        questions = []
        for i, record in enumerate(records):
            where = f"{path}: question {i}"
            if not (isinstance(record, dict) and all(key in record for key in FIELDS)):
                raise VLPruneError(f"{where}: needs {', '.join(FIELDS)}")
            if record["answer"] not in ANSWERS:
                raise VLPruneError(f"{where}: answer {record['answer']!r} is not yes or no")
            image = str(record["image_id"])
            self.images.require(image, where)  # a missing image: an error naming `where`
            questions.append(Question(image, str(record["question"]), ANSWERS[record["answer"]]))
        if not questions:
            raise VLPruneError(f"{path}: no questions")
        return questions

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return YesNoHead(backbone.hidden_size)

    def collate(self, examples: list[Question], backbone: Backbone | Inputs) -> TaskBatch:
        # Tokens cut to text_length (and the backbone's positions); the images as the backbone
        # reads them: region features zero-padded to the most regions, or its processor's pixels.
        batch = encode(
            [e.text for e in examples],
            [e.image for e in examples],
            backbone,
            self.images,
            max_length=self.text_length,
        )
        return TaskBatch([batch], torch.tensor([e.label for e in examples]))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        return (predictions == targets).float().mean().item()
