"""VQA v2 (Goyal et al., 2017): answer an open-ended question about an image.

Reads the official release's pair of files per split, `v2_OpenEnded_mscoco_<split>_questions.json`
(`questions`: `image_id`, `question`, `question_id`) and `v2_mscoco_<split>_annotations.json`
(`annotations`: `question_id`, `image_id`, ten `answers`, `multiple_choice_answer`, …), joined on
`question_id`. Images are `images/<name>.png`, region features `features/<name>.npz` or a UNITER
img_db (keys `coco_<subtype>_<image_id:012>.npz`), named as COCO names its files:
`COCO_<data_subtype>_<image_id:012d>`, the subtype read from the questions file. A split is a
subtype: the release's `train2014` and `val2014` (the world's `train` and `dev`) are found by
themselves. Or UNITER's release: `txt_db/vqa_<name>.db` (`train+trainval+vg` to train on, as
UNITER does, `devval` to score) with `img_db/coco_train2014/`, `coco_val2014/`, `vg/`. Or LXMERT's
`data/`: `vqa/<split>.json` (a list of `question_id`, `img_id`, `sent`, `label` {answer: score};
`train+nominival` to train on, `minival` to score, its answers in `trainval_ans2label.json`)
with `mscoco_imgfeat/*_obj36.tsv`. Or ViLT's tables, `vqav2_<split>.arrow` (a row per image:
its questions, each with its answers, labels and scores; `train+trainable_val`, `rest_val`).

The answer vocabulary is UNITER's (BUTD's): the normalised majority answers given at least
`MIN_ANSWER_COUNT` times over the training and evaluation splits (3,129 answers on VQA v2; this
reader's normalisation is close to, not exactly, BUTD's, so pass UNITER's `ans2label.json` with
`--answer-vocab` for its exact list). A txt_db's targets are already indices into it. The head is
UNITER's: the pooled vector through an MLP to one logit per answer, trained with binary
cross-entropy on the VQA score of each answer, which is also the metric.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.data.arrow import ArrowImage, check_column, columns, split_tables, table_splits
from vl_prune.data.inputs import ImageName, ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, has_dbs, locate, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import DataOptions, Task, TaskBatch
from vl_prune_plugins.tasks.annotations import (
    annotations,
    field,
    is_json_list,
    json_file,
    json_records,
    load_plain_pickle,
)
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs

ANSWERS_PER_QUESTION = 10
#: UNITER's txt_db names (txt_db/vqa_<split>.db), and the ones it trains and scores on
TXT_DB = "vqa"
TXT_DB_TRAIN, TXT_DB_EVAL = ("train", "trainval", "vg"), "devval"
#: ViLT's tables (vqav2_<split>.arrow), and the ones it trains and scores on
ARROW, ARROW_TRAIN, ARROW_EVAL = "vqav2", ("train", "trainable_val"), "rest_val"
#: LXMERT's json (vqa/<split>.json), the ones it trains and scores on, and its answers
LXMERT_TRAIN, LXMERT_EVAL = ("train", "nominival"), "minival"
LXMERT_ANSWERS = "trainval_ans2label.json"
#: where a txt_db's answer vocabulary is kept (UNITER's authors' prepro pickles it beside the
#: db), and how many answers UNITER's head has when none is
ANSWER_FILES = ("ans2label.json", "ans2label.pkl")
UNITER_ANSWERS = 3129
#: BUTD's (and UNITER's) rule: an answer must be the majority answer this often
MIN_ANSWER_COUNT = 9
QUESTIONS = re.compile(r"v2_OpenEnded_mscoco_(?P<subtype>.+)_questions\.json")


@dataclass(frozen=True)
class VqaExample:
    question_id: int | str
    question: str | TokenIds
    image: ImageName
    #: (answer, VQA score) of every answer the annotators gave: normalised answers, or a txt_db's
    #: indices into the answer vocabulary
    scores: tuple[tuple[str | int, float], ...]


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
    """VQA v2: open-ended questions, soft-score classification over UNITER's answers."""

    description = "VQA v2: answer a question about an image (UNITER's head, soft VQA scores)"
    metric = "vqa_score"
    splits = ("train2014", "val2014")
    # UNITER's train-vqa-base-4gpu.json: 6000 steps, peak lr 8e-5, 600 warmup steps.
    recipe: ClassVar[dict] = {"steps": 6000, "lr": 8e-5, "warmup": 0.1, "batch_size": 32}
    reads_answer_vocab = True

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        super().__init__(data, options)
        #: the answer vocabulary: class i of the head is answers[i]; set from --answer-vocab, or
        #: by reading the splits, which `head` and `collate` do if nobody has yet
        self.answers: list[str] | None = None
        if self.options.answer_vocab is not None:
            self.answers = read_answer_vocab(Path(self.options.answer_vocab))

    def default_splits(self) -> tuple[str, str]:
        """UNITER's txt_dbs (`train+trainval+vg` as far as present, `devval`); ViLT's tables
        (`train+trainable_val`, `rest_val`); LXMERT's json (`train+nominival`, `minival`); else
        the subtypes of the official questions files: the one with "train" in its name, then
        the other (`val2014` for the release, `dev` for the world)."""
        if has_dbs(self.data, TXT_DB):
            present = [p for p in TXT_DB_TRAIN if locate(self.data, f"{TXT_DB}_{p}.db")]
            return "+".join(present) or TXT_DB_TRAIN[0], TXT_DB_EVAL
        if splits := table_splits(self.data, ARROW):
            return "+".join(p for p in ARROW_TRAIN if p in splits) or ARROW_TRAIN[0], ARROW_EVAL
        lxmert = annotations(self.data, "vqa", f"{LXMERT_EVAL}.json")
        if is_json_list(lxmert / f"{LXMERT_EVAL}.json"):
            present = [p for p in LXMERT_TRAIN if (lxmert / f"{p}.json").is_file()]
            return "+".join(present) or LXMERT_TRAIN[0], LXMERT_EVAL
        subtypes = sorted(
            match["subtype"]
            for path in self.data.glob("v2_OpenEnded_mscoco_*_questions.json")
            if (match := QUESTIONS.fullmatch(path.name))
            and (self.data / f"v2_mscoco_{match['subtype']}_annotations.json").is_file()
        )
        train = [t for t in subtypes if "train" in t]
        other = sorted((t for t in subtypes if "train" not in t), key=lambda t: "val" not in t)
        if not train or not other:
            return super().default_splits()
        return train[0], other[0]

    def examples(self, split: str) -> list[VqaExample] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split)
        if dbs is not None:
            use_txt_dbs(self, dbs, ImageStore(self.data))
            return TxtDbExamples(dbs, _from_txt_db)
        tables = split_tables(self.data, ARROW, split)
        if tables is not None:
            return [e for path in tables for e in _from_table(path)]
        out = []
        for part in split.split("+"):
            lxmert = annotations(self.data, "vqa", f"{part}.json") / f"{part}.json"
            out += _lxmert(lxmert, self.data) if is_json_list(lxmert) else self._official(part)
        return out

    def _official(self, split: str) -> list[VqaExample]:
        questions_path = self.data / f"v2_OpenEnded_mscoco_{split}_questions.json"
        annotations_path = self.data / f"v2_mscoco_{split}_annotations.json"
        subtype, questions = _questions(questions_path)
        answers = _annotations(annotations_path)
        store = ImageStore(self.data, db_keys)
        out = []
        for question_id, (image_id, text) in questions.items():
            where = f"{questions_path}: question_id {question_id}"
            if question_id not in answers:
                raise VLPruneError(f"{where}: no annotation in {annotations_path}")
            annotated_image, ten, _ = answers[question_id]
            if annotated_image != image_id:
                raise VLPruneError(
                    f"{where}: image_id {image_id}, but {annotations_path} says {annotated_image}"
                )
            name = f"COCO_{subtype}_{image_id:012d}"
            store.require(name, where)
            out.append(VqaExample(question_id, text, name, tuple(vqa_scores(ten).items())))
        if unasked := answers.keys() - questions.keys():
            raise VLPruneError(
                f"{annotations_path}: question_id {min(unasked)} has no question in "
                f"{questions_path}"
            )
        if not out:
            raise VLPruneError(f"{questions_path}: no questions")
        return out

    def vocabulary(self) -> list[str]:
        """The answers the head chooses from (see the module's docstring)."""
        if self.answers is None:
            self.answers = self._read_vocabulary()
        return self.answers

    def _read_vocabulary(self) -> list[str]:
        if has_dbs(self.data, TXT_DB):
            dbs = split_dbs(self.data, TXT_DB, self.train_split) or []
            for folder in (self.data, *(db.path for db in dbs)):
                for name in ANSWER_FILES:
                    if (folder / name).is_file():
                        return read_answer_vocab(folder / name)
            return [f"answer {i}" for i in range(UNITER_ANSWERS)]
        tables = split_tables(self.data, ARROW, self.train_split)
        if tables is not None:
            return _table_vocabulary(tables)
        lxmert = annotations(self.data, "vqa", LXMERT_ANSWERS)
        if (lxmert / LXMERT_ANSWERS).is_file():
            return read_answer_vocab(lxmert / LXMERT_ANSWERS)
        parts = self.train_split.split("+")
        files = [annotations(self.data, "vqa", f"{p}.json") / f"{p}.json" for p in parts]
        if all(is_json_list(path) for path in files):  # LXMERT's json without its answer file
            given = {a for path in files for e in _lxmert(path, self.data) for a, _ in e.scores}
            return sorted(given)
        majority: Counter[str] = Counter()
        for split in dict.fromkeys((self.train_split, self.eval_split)):
            for part in split.split("+"):
                path = self.data / f"v2_mscoco_{part}_annotations.json"
                majority.update(chosen for _, _, chosen in _annotations(path).values())
        answers = sorted(a for a, n in majority.items() if n >= MIN_ANSWER_COUNT)
        if not answers:
            raise VLPruneError(
                f"{self.data}: no answer is the majority answer of {MIN_ANSWER_COUNT} questions; "
                "give the answers with --answer-vocab"
            )
        return answers

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return VqaHead(backbone.hidden_size, len(self.vocabulary()))

    def collate(self, examples: list[VqaExample], backbone: Backbone) -> TaskBatch:
        answers = self.vocabulary()
        columns = {answer: i for i, answer in enumerate(answers)}
        targets = torch.zeros(len(examples), len(columns))
        for row, example in enumerate(examples):
            for answer, score in example.scores:
                if isinstance(answer, int):
                    if not 0 <= answer < len(answers):
                        raise VLPruneError(
                            f"question {example.question_id}: answer label {answer} is outside "
                            f"the {len(answers)} answers of the vocabulary"
                        )
                    targets[row, answer] = score
                # Answers outside the vocabulary get no target mass, as in UNITER and BUTD.
                elif answer in columns:
                    targets[row, columns[answer]] = score
        batch = encode(
            [e.question for e in examples],
            [e.image for e in examples],
            backbone,
            ImageStore(self.data, db_keys),
            max_length=self.text_length,
        )
        return TaskBatch([batch], targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # UNITER scales the mean over batch × answers by the number of answers (a sum per answer).
        bce = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return bce * targets.shape[1]

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        # The predicted answer's VQA score: the official metric (given normalised answers).
        return targets.gather(1, predictions[:, None]).mean().item()


def db_keys(image: str) -> list[str]:
    """UNITER's img_db key of a COCO image: `COCO_val2014_000000131089` is
    `coco_val2014_000000131089.npz`."""
    return [f"{image.lower()}.npz"]


NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ARTICLES = {"a", "an", "the"}
# VQA's evaluation: a full stop not inside a number goes, as does other punctuation.
_STOP = re.compile(r"(?<!\d)\.(?!\d)")
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:|~]")


def normalise(answer: str) -> str:
    """An answer as VQA's evaluation compares them: lowercase, punctuation and articles
    dropped, number words as digits ("Two dogs." → "2 dogs"); its table of contractions is not
    applied."""
    text = _PUNCTUATION.sub("", _STOP.sub("", answer.lower().replace("\n", " ")))
    words = [w for w in text.split() if w not in ARTICLES]
    return " ".join(str(NUMBERS.index(w)) if w in NUMBERS else w for w in words)


def vqa_scores(answers: tuple[str, ...]) -> dict[str, float]:
    """Each given answer's VQA score: min(#annotators who gave it / 3, 1) averaged over the
    subsets that leave one annotator out, as the official evaluation does (0.3, 0.6, 0.9 and 1
    for one to four of ten, BUTD's and UNITER's targets)."""
    total = len(answers)
    return {
        answer: (n * min((n - 1) / 3, 1.0) + (total - n) * min(n / 3, 1.0)) / total
        for answer, n in Counter(answers).items()
    }


def read_answer_vocab(path: Path) -> list[str]:
    """An answer vocabulary file: {answer: index} (UNITER's and LXMERT's ans2label.json, or the
    same pickled, read without running code), the indices 0…n-1, or a list of answers."""
    if path.suffix == ".pkl":
        with path.open("rb") as file:
            content = load_plain_pickle(file, path)
    else:
        content = json_file(path)
    if isinstance(content, list) and all(isinstance(a, str) for a in content):
        answers = content
    elif isinstance(content, dict) and sorted(content.values()) == list(range(len(content))):
        answers = sorted(content, key=content.__getitem__)
    else:
        raise VLPruneError(f"{path}: expected {{answer: index}} with indices 0…n-1, or a list")
    if not answers:
        raise VLPruneError(f"{path}: no answers")
    return answers


def _lxmert(path: Path, data: Path) -> list[VqaExample]:
    """LXMERT's VQA json: a list of `question_id`, `img_id` (COCO's file stem), `sent` and
    `label` (answer → its VQA score)."""
    store = ImageStore(data, db_keys)
    out = []
    for where, record in json_records(path):
        label = field(record, "label", dict, where)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label.values()):
            raise VLPruneError(f"{where}: label scores should be numbers, got {label!r}")
        image = field(record, "img_id", str, where)
        store.require(image, where)
        question_id = field(record, "question_id", int, where)
        # LXMERT's answers are normalised already, as its trainval_ans2label.json names them.
        scores = tuple((a, float(v)) for a, v in label.items())
        out.append(VqaExample(question_id, field(record, "sent", str, where), image, scores))
    if not out:
        raise VLPruneError(f"{path}: no questions")
    return out


TABLE_COLUMNS = {
    "questions": "[str]",
    "question_id": "[int]",
    "answers": "[[str]]",
    "answer_scores": "[[float]]",
}


def _from_table(path: Path) -> list[VqaExample]:
    """The questions of one of ViLT's VQA tables: a row per image, with its `questions`,
    `question_id`s, and each question's `answers` and `answer_scores`."""
    check_column(path, "image")
    rows = columns(path, TABLE_COLUMNS)
    out = []
    for row, (questions, ids, answers, scores) in enumerate(zip(*rows.values(), strict=True)):
        if not len(questions) == len(ids) == len(answers) == len(scores):
            raise VLPruneError(f"{path}: row {row}: a question without its id or answers")
        image = ArrowImage(path, row, "image")
        for question, question_id, given, score in zip(
            questions, ids, answers, scores, strict=True
        ):
            if len(given) != len(score):
                raise VLPruneError(
                    f"{path}: row {row}: question {question_id} has not a score per answer"
                )
            pairs = tuple(zip(given, map(float, score), strict=True))
            out.append(VqaExample(question_id, question, image, pairs))
    return out


def _table_vocabulary(paths: list[Path]) -> list[str]:
    """ViLT's answer labels: its tables give each label (`answer_labels`) with its answer."""
    names: dict[int, str] = {}
    for path in paths:
        rows = columns(path, {"answer_labels": "[[int]]", "answers": "[[str]]"})
        for row, (labels, answers) in enumerate(zip(*rows.values(), strict=True)):
            if [len(a) for a in labels] != [len(a) for a in answers]:
                raise VLPruneError(f"{path}: row {row}: answer_labels do not match answers")
            for label_list, answer_list in zip(labels, answers, strict=True):
                names.update(zip(label_list, answer_list, strict=True))
    size = max(UNITER_ANSWERS, max(names, default=-1) + 1)
    return [names.get(i, f"answer {i}") for i in range(size)]


def _from_txt_db(db: TxtDb, key: str, record: dict) -> VqaExample:
    """An example of UNITER's VQA txt_db: `input_ids`, `img_fname`, and `target`, the answer
    labels and their scores."""
    where = f"{db.path}: key {key!r}"
    target = record.get("target")
    if not isinstance(target, dict):
        raise VLPruneError(f"{where}: no 'target' (an unlabelled split?)")
    labels, scores = target.get("labels"), target.get("scores")
    if (
        not isinstance(labels, list)
        or not isinstance(scores, list)
        or len(labels) != len(scores)
        or not all(isinstance(label, int) for label in labels)
    ):
        raise VLPruneError(f"{where}: 'target' should hold as many 'labels' as 'scores'")
    (image,) = image_names(record, 1, where)
    return VqaExample(
        record.get("question_id", key),
        db.with_specials(record["input_ids"]),
        image,
        tuple(zip(labels, map(float, scores), strict=True)),
    )


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


def _annotations(path: Path) -> dict[int, tuple[int, tuple[str, ...], str]]:
    """question_id → (image_id, the ten normalised answers, the normalised majority answer)."""
    content = json_file(path)
    if not isinstance(content, dict):
        raise VLPruneError(f"{path}: expected a JSON object with 'annotations'")
    out: dict[int, tuple[int, tuple[str, ...], str]] = {}
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
        majority = normalise(field(record, "multiple_choice_answer", str, where))
        out[question_id] = image_id, tuple(ten), majority
    return out


def _records(content: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    records = field(content, key, list, str(path))
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise VLPruneError(f"{path}: {key}[{i}] should be an object, got {record!r}")
    return records
