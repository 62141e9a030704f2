"""GQA (Hudson and Manning, 2019): answer a compositional question about an image.

A split is read from one of two files in the data folder, the first that exists:

- `<split>_balanced_questions.json`, GQA's release: `{question_id: {"imageId", "question",
  "answer", "fullAnswer", "types", "semantic", …}}`;
- `<split>.json`, LXMERT's preprocessed GQA (also VOLTA's): `[{"img_id", "sent", "label":
  {answer: score}, "question_id": "…"}]`, whose gold answer is the label with the highest score;
  in the folder or in its `gqa/` (LXMERT's `data/` layout), its answers from
  `trainval_ans2label.json` beside it, and its features from LXMERT's `*obj36.tsv` files.

So `task.examples("testdev")` reads `testdev_balanced_questions.json`, or else `testdev.json`.
Images are `images/<imageId>.png`, region features `features/<imageId>.npz` or a UNITER img_db
(keys `gqa_<imageId>.npz`, as UNITER's authors' fuller prepro names them). Their prepro also
writes GQA txt_dbs (`txt_db/gqa_<split>.db`: each question's record with its `answer`, plus
`input_ids` and `img_fname`), which are read too. Splits without answers (`test`,
`submission`) cannot be read. The default splits are `train` and `testdev`, the split GQA
results are reported on. The head is UNITER's VQA head over the answers of the training split
(or `--answer-vocab`, e.g. LXMERT's `trainval_ans2label.json`), trained with cross-entropy: a
GQA question has exactly one gold answer (LXMERT's labels all score it 1.0), so a softmax over
answers fits the metric, accuracy of the argmax, better than VQA's per-answer soft scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone
from vl_prune.data.inputs import ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import DataOptions, Task, TaskBatch
from vl_prune_plugins.tasks.annotations import annotations, field, json_file
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs
from vl_prune_plugins.tasks.vqa import VqaHead, read_answer_vocab

IGNORE = -100  # the target of an answer outside the training vocabulary: no loss, never right

#: txt_db names of UNITER's authors' prepro: txt_db/gqa_<split>.db
TXT_DB = "gqa"
#: the answer vocabulary LXMERT's GQA files come with
LXMERT_ANSWERS = "trainval_ans2label.json"


@dataclass(frozen=True)
class GqaExample:
    question_id: str
    question: str | TokenIds
    image: str
    answer: str


def db_keys(image: str) -> list[str]:
    """The img_db key of a GQA image: `gqa_n161313.npz`; Visual Genome numbers zero-padded,
    `gqa_000000002354.npz`."""
    return [f"gqa_{int(image):012}.npz" if image.isdigit() else f"gqa_{image}.npz"]


class Gqa(Task):
    """GQA: compositional questions, one gold answer each (UNITER's VQA head, accuracy)."""

    description = "GQA: answer a compositional question about an image (UNITER's VQA head)"
    metric = "accuracy"
    splits = ("train", "testdev")
    # UNITER ships no GQA config; the paper fine-tunes GQA as VQA: train-vqa-base-4gpu.json,
    # 6000 steps, peak lr 8e-5, 600 warmup steps.
    recipe: ClassVar[dict] = {"steps": 6000, "lr": 8e-5, "warmup": 0.1, "batch_size": 32}
    reads_answer_vocab = True

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        super().__init__(data, options)
        #: the answer vocabulary: class i of the head is answers[i]; --answer-vocab's, or those
        #: of the training split, sorted, read by `head` and `collate` if nobody has yet
        self.answers: list[str] | None = None
        if self.options.answer_vocab is not None:
            self.answers = read_answer_vocab(Path(self.options.answer_vocab))

    def examples(self, split: str) -> list[GqaExample] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split)
        if dbs is not None:
            use_txt_dbs(self, dbs, ImageStore(self.data, db_keys))
            examples = TxtDbExamples(dbs, _from_txt_db)
            if split == self.train_split and self.answers is None:
                self.answers = sorted({e.answer for e in examples})
            return examples
        store = ImageStore(self.data, db_keys)
        out = []
        for part in split.split("+"):
            path, records = self._records(part)
            found = []
            for where, example in records:
                store.require(example.image, where)
                found.append(example)
            if not found:
                raise VLPruneError(f"{path}: no questions")
            out += found
        if split == self.train_split and self.answers is None:
            self.answers = self._lxmert_answers() or sorted({e.answer for e in out})
        return out

    def _records(self, split: str) -> tuple[Path, list[tuple[str, GqaExample]]]:
        official = self.data / f"{split}_balanced_questions.json"
        lxmert = annotations(self.data, "gqa", f"{split}.json") / f"{split}.json"
        if official.is_file():
            return official, _balanced_questions(official)
        if lxmert.is_file():
            return lxmert, _lxmert_questions(lxmert)
        raise VLPruneError(
            f"{self.data}: split {split!r} has neither {official.name} (GQA's release) "
            f"nor {lxmert.name} (LXMERT's GQA)"
        )

    def _lxmert_answers(self) -> list[str] | None:
        """LXMERT's answer vocabulary, where its GQA files come with it."""
        folder = annotations(self.data, "gqa", LXMERT_ANSWERS)
        path = folder / LXMERT_ANSWERS
        return read_answer_vocab(path) if path.is_file() else None

    def vocabulary(self) -> list[str]:
        """The answers the head chooses from, reading the training split if not done yet."""
        if self.answers is None:
            self.examples(self.train_split)
        return self.answers

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return VqaHead(backbone.hidden_size, len(self.vocabulary()))

    def collate(self, examples: list[GqaExample], backbone: Backbone) -> TaskBatch:
        columns = {answer: i for i, answer in enumerate(self.vocabulary())}
        batch = encode(
            [e.question for e in examples],
            [e.image for e in examples],
            backbone,
            ImageStore(self.data, db_keys),
            max_length=self.text_length,
        )
        targets = torch.tensor([columns.get(e.answer, IGNORE) for e in examples])
        return TaskBatch([batch], targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # A batch of nothing but unlabelled examples has no loss (cross-entropy's mean is NaN).
        return nn.functional.cross_entropy(
            logits, targets, ignore_index=IGNORE, reduction="sum"
        ) / (targets != IGNORE).sum().clamp(min=1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        # Answers outside the training vocabulary (target IGNORE) count as wrong, as in GQA's
        # evaluation, where the model could not have given them.
        return (predictions == targets).float().mean().item()


def _balanced_questions(path: Path) -> list[tuple[str, GqaExample]]:
    """(where, example) of every question of a release file, in file order."""
    content = json_file(path)
    if not isinstance(content, dict):
        raise VLPruneError(f"{path}: expected a JSON object of question_id → question")
    out = []
    for question_id, record in content.items():
        where = f"{path}: question {question_id}"
        example = GqaExample(
            question_id,
            field(record, "question", str, where),
            field(record, "imageId", str, where),
            field(record, "answer", str, where),
        )
        out.append((where, example))
    return out


def _lxmert_questions(path: Path) -> list[tuple[str, GqaExample]]:
    """(where, example) of every question of an LXMERT file, in file order."""
    content = json_file(path)
    if not isinstance(content, list):
        raise VLPruneError(f"{path}: expected a JSON list of questions (LXMERT's GQA layout)")
    seen: set[str] = set()
    out = []
    for i, record in enumerate(content):
        where = f"{path}: [{i}]"
        question_id = field(record, "question_id", str, where)
        where = f"{where} (question_id {question_id})"
        if question_id in seen:
            raise VLPruneError(f"{where}: question_id {question_id} appears twice")
        seen.add(question_id)
        label = field(record, "label", dict, where)
        for answer, score in label.items():
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise VLPruneError(f"{where}: label {answer!r} has score {score!r}, not a number")
        if not label:
            raise VLPruneError(f"{where}: label is empty, no gold answer")
        gold = max(label, key=label.__getitem__)  # the first of equal scores
        image = field(record, "img_id", str, where)
        out.append((where, GqaExample(question_id, field(record, "sent", str, where), image, gold)))
    return out


def _from_txt_db(db: TxtDb, key: str, record: dict) -> GqaExample:
    """A question of a GQA txt_db: its release record (`answer`) with `input_ids` and
    `img_fname`."""
    where = f"{db.path}: key {key!r}"
    answer = record.get("answer")
    if not isinstance(answer, str):
        raise VLPruneError(f"{where}: no 'answer' (an unlabelled split?)")
    (image,) = image_names(record, 1, where)
    return GqaExample(key, db.with_specials(record["input_ids"]), image, answer)
