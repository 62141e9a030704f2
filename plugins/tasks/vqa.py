"""VQA v2 (Goyal et al., 2017): answer an open-ended question about an image.

Reads the official release's pair of files per split, `v2_OpenEnded_mscoco_<split>_questions.json`
(`questions`: `image_id`, `question`, `question_id`) and `v2_mscoco_<split>_annotations.json`
(`annotations`: `question_id`, `image_id`, ten `answers`, …), joined on `question_id`. Images are
`images/<name>.png` and region features `features/<name>.npz`, named as COCO names its files:
`COCO_<data_subtype>_<image_id:012d>`, with the subtype read from the questions file.
The world's splits are the subtypes `train` and `dev`. The real release keeps its file names, so
its splits are its subtypes: `task.examples("val2014")`, and `task.splits = ("train2014",
"val2014")` to train on it (the answer vocabulary comes from `splits[0]`). The head is UNITER's:
the pooled vector through an MLP to one logit per training answer, trained with binary
cross-entropy on soft VQA scores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.task import Task, TaskBatch
from vl_prune_plugins.tasks.annotations import field, json_file, write_json
from vl_prune_plugins.tasks.inputs import ImageStore, encode
from vl_prune_plugins.world import VERSION as WORLD_VERSION

ANSWERS_PER_QUESTION = 10
WORLD_SIZES = {"train": 2000, "dev": 500}
QUESTIONS_PER_IMAGE = 2
# The world's files carry the official header fields; the license is the project's own.
INFO = {
    "description": "The embedded synthetic world of vl_prune, in the layout of VQA v2.0.",
    "url": "",
    "version": "2.0",
    "year": 1970,
    "contributor": "vl_prune",
    # Fixed, so that the same seed always writes the same bytes.
    "date_created": "1970-01-01 00:00:00",
}
LICENSE = {"url": "https://opensource.org/licenses/MIT", "name": "MIT License"}


@dataclass(frozen=True)
class VqaExample:
    question_id: int
    question: str
    image: str
    #: the ten annotators' answers, normalised
    answers: tuple[str, ...]


class VqaHead(nn.Module):
    """UNITER's VQA head: pooled → Linear(H, 2H) → GELU → LayerNorm → Linear(2H, answers)."""

    def __init__(self, hidden: int, answers: int):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(hidden, 2 * hidden),
            nn.GELU(),
            nn.LayerNorm(2 * hidden, eps=1e-12),
            nn.Linear(2 * hidden, answers),
        )

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> torch.Tensor:
        (batch,) = inputs
        return self.classifier(backbone(batch).pooled)


class Vqa(Task):
    """VQA v2: open-ended questions, soft-score classification over the training answers."""

    description = "VQA v2: answer a question about an image (UNITER's head, soft VQA scores)"
    metric = "vqa_score"
    world_version = WORLD_VERSION
    # UNITER's train-vqa-base-4gpu.json: 6000 steps, peak lr 8e-5, 600 warmup steps.
    recipe: ClassVar[dict] = {"steps": 6000, "lr": 8e-5, "warmup": 0.1, "batch_size": 32}
    world_recipe: ClassVar[dict] = {"steps": 150, "lr": 1e-3, "batch_size": 32}
    #: an answer joins the vocabulary if annotators gave it on at least this many training
    #: questions: every answer, in the world. Raise it for the real release, whose answers are
    #: open-ended; UNITER uses BUTD's 3,129 answers (majority answers of ≥ 9 train+val questions).
    min_answer_count: int = 1

    def __init__(self, data: str | Path):
        super().__init__(data)
        #: the answer vocabulary, sorted: class i of the head is answers[i]; set by reading the
        #: training split (`splits[0]`), which `head` and `collate` do if nobody has yet
        self.answers: list[str] | None = None

    def examples(self, split: str) -> list[VqaExample]:
        questions_path = self.data / f"v2_OpenEnded_mscoco_{split}_questions.json"
        annotations_path = self.data / f"v2_mscoco_{split}_annotations.json"
        subtype, questions = _questions(questions_path)
        answers = _annotations(annotations_path)
        store = ImageStore(self.data)
        out = []
        for question_id, (image_id, text) in questions.items():
            where = f"{questions_path}: question_id {question_id}"
            if question_id not in answers:
                raise VLPruneError(f"{where}: no annotation in {annotations_path}")
            annotated_image, ten = answers.pop(question_id)
            if annotated_image != image_id:
                raise VLPruneError(
                    f"{where}: image_id {image_id}, but {annotations_path} says {annotated_image}"
                )
            name = f"COCO_{subtype}_{image_id:012d}"
            store.require(name, where)
            out.append(VqaExample(question_id, text, name, ten))
        if answers:
            raise VLPruneError(
                f"{annotations_path}: question_id {next(iter(answers))} has no question in "
                f"{questions_path}"
            )
        if not out:
            raise VLPruneError(f"{questions_path}: no questions")
        if split == self.splits[0]:
            self._set_vocabulary(out)
        return out

    def vocabulary(self) -> list[str]:
        """The answers the head chooses from, reading the training split if not done yet."""
        if self.answers is None:
            self.examples(self.splits[0])
        return self.answers

    def _set_vocabulary(self, examples: list[VqaExample]) -> None:
        given = Counter(answer for e in examples for answer in set(e.answers))
        self.answers = sorted(a for a, n in given.items() if n >= self.min_answer_count)

    @classmethod
    def write_world(cls, out: Path, seed: int = 0) -> None:
        from vl_prune_plugins.world.images import new_scene, scene_rng, write_image
        from vl_prune_plugins.world.language import human_answers, question
        from vl_prune_plugins.world.scenes import WorldSettings

        settings = WorldSettings(seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        for split, size in WORLD_SIZES.items():
            rng = scene_rng(settings, "vqa", split)
            questions, annotations = [], []
            for i in range(size):
                # COCO image ids start at 1; VQA v2 numbers an image's questions image_id*1000+k.
                image_id, k = i // QUESTIONS_PER_IMAGE + 1, i % QUESTIONS_PER_IMAGE
                scene = new_scene(settings, "vqa", split, image_id)
                if k == 0:
                    write_image(scene, f"COCO_{split}_{image_id:012d}", out, settings)
                text, answer, kind = question(scene, rng, settings)
                ten = human_answers(answer, kind, rng, settings)
                question_id = image_id * 1000 + k
                questions.append(
                    {"image_id": image_id, "question": text, "question_id": question_id}
                )
                annotations.append(_annotation(question_id, image_id, text, ten, kind))
            write_json(
                out / f"v2_OpenEnded_mscoco_{split}_questions.json",
                {
                    "info": INFO,
                    "task_type": "Open-Ended",
                    "data_type": "mscoco",
                    "license": LICENSE,
                    "data_subtype": split,
                    "questions": questions,
                },
            )
            write_json(
                out / f"v2_mscoco_{split}_annotations.json",
                {
                    "info": INFO,
                    "license": LICENSE,
                    "data_subtype": split,
                    "annotations": annotations,
                },
            )

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return VqaHead(backbone.hidden_size, len(self.vocabulary()))

    def collate(self, examples: list[VqaExample], backbone: Backbone) -> TaskBatch:
        columns = {answer: i for i, answer in enumerate(self.vocabulary())}
        targets = torch.zeros(len(examples), len(columns))
        for row, example in enumerate(examples):
            # Answers outside the training vocabulary get no target mass, as in UNITER and BUTD.
            for answer, score in soft_scores(example.answers).items():
                if answer in columns:
                    targets[row, columns[answer]] = score
        batch = encode(
            [e.question for e in examples],
            [e.image for e in examples],
            backbone,
            ImageStore(self.data),
        )
        return TaskBatch([batch], targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # UNITER scales the mean over batch × answers by the number of answers (a sum per answer).
        bce = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return bce * targets.shape[1]

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        # The predicted answer's min(n / 3, 1), the common approximation of the official metric.
        return targets.gather(1, predictions[:, None]).mean().item()


def normalise(answer: str) -> str:
    """Lowercase, stripped, without a trailing full stop: the least of the official evaluation's
    normalisation (which also maps number words to digits and drops articles and punctuation)."""
    return answer.strip().lower().removesuffix(".").strip()


def soft_scores(answers: tuple[str, ...]) -> dict[str, float]:
    """Each given answer's VQA score, min(#annotators who gave it / 3, 1): the standard training
    target, and the usual approximation of the official metric (which averages that score over
    the ten subsets of nine annotators)."""
    return {answer: min(n / 3, 1.0) for answer, n in Counter(answers).items()}


def _questions(path: Path) -> tuple[str, dict[int, tuple[int, str]]]:
    """The file's data_subtype, and question_id → (image_id, question) in file order."""
    content = json_file(path)
    if not isinstance(content, dict):
        raise VLPruneError(f"{path}: expected a JSON object with 'questions'")
    subtype = field(content, "data_subtype", str, str(path))
    out: dict[int, tuple[int, str]] = {}
    for i, record in enumerate(_records(content, "questions", path)):
        where = f"{path}: questions[{i}]"
        question_id = field(record, "question_id", int, where)
        if question_id in out:
            raise VLPruneError(f"{where}: question_id {question_id} appears twice")
        image_id = field(record, "image_id", int, where)
        out[question_id] = image_id, field(record, "question", str, where)
    return subtype, out


def _annotations(path: Path) -> dict[int, tuple[int, tuple[str, ...]]]:
    """question_id → (image_id, the ten normalised answers)."""
    content = json_file(path)
    if not isinstance(content, dict):
        raise VLPruneError(f"{path}: expected a JSON object with 'annotations'")
    out: dict[int, tuple[int, tuple[str, ...]]] = {}
    for i, record in enumerate(_records(content, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        question_id = field(record, "question_id", int, where)
        where = f"{where} (question_id {question_id})"
        if question_id in out:
            raise VLPruneError(f"{where}: question_id {question_id} appears twice")
        image_id = field(record, "image_id", int, where)
        answers = field(record, "answers", list, where)
        if len(answers) != ANSWERS_PER_QUESTION:
            raise VLPruneError(
                f"{where}: {len(answers)} answers, VQA v2 has {ANSWERS_PER_QUESTION} per question"
            )
        ten = []
        for j, answer in enumerate(answers):
            if not isinstance(answer, dict):
                raise VLPruneError(f"{where}: answers[{j}] should be an object, got {answer!r}")
            ten.append(normalise(field(answer, "answer", str, f"{where}: answers[{j}]")))
        out[question_id] = image_id, tuple(ten)
    return out


def _records(content: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    records = field(content, key, list, str(path))
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise VLPruneError(f"{path}: {key}[{i}] should be an object, got {record!r}")
    return records


def _annotation(question_id: int, image_id: int, text: str, answers: list[str], kind: str) -> dict:
    """An annotation in the official release's field order."""
    return {
        # VQA's question types are leading words: "how many", "is there", "what color", …
        "question_type": " ".join(text.split()[:2]),
        "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": j}
            for j, answer in enumerate(answers, 1)
        ],
        "image_id": image_id,
        "answer_type": kind,
        "question_id": question_id,
    }
