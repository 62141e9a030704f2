"""VCR (Zellers et al., 2019): answer a question about a movie still, then pick the rationale.

Reads the release's JSON lines (`train.jsonl`, `val.jsonl`; `test.jsonl` has no labels): per
line `objects` (class names), a `question`, four `answer_choices` and four `rationale_choices`
whose tokens are words or lists of indices into `objects` (["Does", [0], "live", "here", "?"]),
`answer_label`, `rationale_label`, `img_fn` and `annot_id`. A reference becomes its objects'
class names joined by "and" ([0, 2] → "person and car"). UNITER instead adds a word per person
(81 new embeddings) and puts the objects' boxes first among the regions; new words would
change the tiny presets' vocabulary, and class names serve pixel backbones too. The picture and
region features of a line are `images/<stem>.png` and `features/<stem>.npz`, stem being
`img_fn`'s file name without extension, or UNITER's img_db entries `vcr_gt_<split>_<stem>.npz`
(the objects' boxes) and `vcr_<split>_<stem>.npz` (detected boxes), read one after the other as
UNITER does. Or UNITER's release as it is: `txt_db/vcr_<split>.db` (question, answer and
rationale ids, UNITER's person words included: the backbone's word embedding grows by 81, as in
UNITER's VCR fine-tuning) with `img_db/vcr_gt_<split>/` and `img_db/vcr_<split>/`.

Q→A and QA→R are both four-way multiple choice: each choice is encoded with the image (question
and answer choice; question and right answer, and rationale choice), its pooled vector goes
through UNITER's VCR MLP to one logit, and cross-entropy runs over the four logits (UNITER
trains each choice as right/wrong with two logits and ranks by the "right" one). The score is
Q→AR accuracy: the answer and its rationale both right.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.data.inputs import ImageName, ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import DataOptions, Task, TaskBatch
from vl_prune_plugins.tasks.annotations import field, json_lines
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs

CHOICES = 4
#: UNITER's txt_db names (txt_db/vcr_<split>.db), whose examples are the ids of id2len_qar.json
TXT_DB, TXT_DB_LENGTHS = "vcr", "id2len_qar.json"
#: the words UNITER's VCR txt_dbs add after the tokenizer's, person_0 … person_80, listed in
#: their special_tokens.json
PERSON_WORDS = 81


@dataclass(frozen=True)
class VcrExample:
    """A question with its choices: strings, or a txt_db's ids (the question framed by [CLS]
    and [SEP], each choice closed by [SEP])."""

    annot_id: str
    question: str | TokenIds
    answers: tuple[str, ...] | tuple[TokenIds, ...]
    rationales: tuple[str, ...] | tuple[TokenIds, ...]
    answer_label: int
    rationale_label: int
    image: ImageName


class ChoiceHead(nn.Module):
    """UNITER's VCR head with one logit per choice: pooled → Linear(H, 2H) → ReLU → LayerNorm →
    Linear(2H, 1). Each input holds an example's four choices in consecutive rows, so one
    backbone call scores every choice of a batch; the output is B × 2 × 4 (Q→A, QA→R)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(hidden, 2 * hidden),
            nn.ReLU(),
            nn.LayerNorm(2 * hidden, eps=1e-12),
            nn.Linear(2 * hidden, 1),
        )

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> torch.Tensor:
        scores = [self.classifier(backbone(batch).pooled).view(-1, CHOICES) for batch in inputs]
        return torch.stack(scores, dim=1)


class Vcr(Task):
    """VCR: Q→A and QA→R multiple choice (UNITER's head, one logit per choice), Q→AR accuracy."""

    description = "VCR: pick the answer, then the rationale (UNITER's head, one logit per choice)"
    # Named apart from UNITER's logs, where "qar" is QA→R and the joint score is plain "acc".
    metric = "q_ar_accuracy"
    splits = ("train", "val")
    # UNITER's train-vcr-base-4gpu.json: a question, an answer and a rationale fit in 220 tokens.
    max_text_len = 220
    # UNITER's train-vcr-base-4gpu.json: 8000 steps, lr 6e-5, 800 warmup steps; its batches of
    # 4000 tokens × 5 accumulation × 4 GPUs hold ~80 questions of 8 choices here.
    recipe: ClassVar[dict] = {
        "steps": 8000,
        "lr": 6e-5,
        "warmup": 0.1,
        "batch_size": 16,
        "grad_accumulation": 5,
        "seed": 42,
    }

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        super().__init__(data, options)
        #: the words a txt_db adds to its tokenizer's (UNITER's person words)
        self.new_words = 0

    def examples(self, split: str) -> list[VcrExample] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split, TXT_DB_LENGTHS)
        if dbs is not None:
            use_txt_dbs(self, dbs, ImageStore(self.data))
            for db in dbs:
                listed = db.path / "special_tokens.json"
                words = len(db.json(listed.name)) if listed.is_file() else PERSON_WORDS
                self.new_words = max(self.new_words, words)
            self.text_vocabulary = replace(self.text_vocabulary, added=self.new_words)
            return TxtDbExamples(dbs, _from_txt_db)
        path = self.data / f"{split}.jsonl"
        store = ImageStore(self.data)
        out = []
        for where, record in json_lines(path):
            objects = field(record, "objects", list, where)
            if not all(isinstance(name, str) for name in objects):
                raise VLPruneError(f"{where}: field 'objects' should list class names")
            question = text(field(record, "question", list, where), objects, f"{where}: question")
            answers = _choices(record, "answer_choices", objects, where)
            rationales = _choices(record, "rationale_choices", objects, where)
            answer_label = _label(record, "answer_label", where)
            rationale_label = _label(record, "rationale_label", where)
            image = _image(PurePosixPath(field(record, "img_fn", str, where)).stem, split, store)
            store.require(image, where)
            annot_id = field(record, "annot_id", str, where)
            out.append(
                VcrExample(
                    annot_id, question, answers, rationales, answer_label, rationale_label, image
                )
            )
        if not out:
            raise VLPruneError(f"{path}: no examples")
        return out

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        if self.text_vocabulary is not None:
            backbone.ensure_vocabulary(self.text_vocabulary.size + self.new_words)
        return ChoiceHead(backbone.hidden_size)

    def collate(self, examples: list[VcrExample], backbone: Backbone) -> TaskBatch:
        store = ImageStore(self.data)
        images = [e.image for e in examples for _ in range(CHOICES)]
        questions = [e.question for e in examples for _ in range(CHOICES)]
        answered = [
            _then(e.question, e.answers[e.answer_label]) for e in examples for _ in range(CHOICES)
        ]
        answers = [answer for e in examples for answer in e.answers]
        rationales = [rationale for e in examples for rationale in e.rationales]
        # A txt_db's person words come after its tokenizer's, where the head grew the vocabulary.
        new_words = self.new_words if self.text_vocabulary is not None else 0
        length = self.text_length
        return TaskBatch(
            [
                _choices_batch(questions, answers, images, backbone, store, length, new_words),
                _choices_batch(answered, rationales, images, backbone, store, length, new_words),
            ],
            torch.tensor([[e.answer_label, e.rationale_label] for e in examples]),
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The mean of the Q→A and QA→R losses: UNITER trains on both sets of questions alike.
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracies(predictions, targets)["q_ar"]


def _choices_batch(
    texts: list,
    choices: list,
    images: list[ImageName],
    backbone: Backbone,
    store: ImageStore,
    max_length: int,
    new_words: int,
) -> VLBatch:
    """[CLS] text [SEP] choice [SEP] with the image, every word of token type 0: a pair's second
    segment would get type 1, UNITER's image type (its VCR model adds types 2 and 3 for answers
    and rationales, initialised from type 0)."""
    batch = encode(
        texts,
        images,
        backbone,
        store,
        pairs=choices,
        max_length=max_length,
        new_words=new_words,
    )
    batch.token_type_ids = torch.zeros_like(batch.input_ids)
    return batch


def _then(question: str | TokenIds, answer: str | TokenIds) -> str | TokenIds:
    """The question followed by its answer, the text QA→R's choices are paired with."""
    return f"{question} {answer}" if isinstance(question, str) else question + answer


def _image(stem: str, split: str, store: ImageStore) -> ImageName:
    """A line's image: its own files (`features/<stem>.npz`, `images/<stem>.png`), else
    UNITER's img_db entries of the split, ground-truth boxes first."""
    if store.has(stem):
        return stem
    present = tuple(n for n in (f"vcr_gt_{split}_{stem}", f"vcr_{split}_{stem}") if store.has(n))
    return present if len(present) > 1 else (present[0] if present else stem)


def _from_txt_db(db: TxtDb, key: str, record: dict) -> VcrExample:
    """A question of UNITER's VCR txt_db: `input_ids`, `input_ids_as` and `input_ids_rs` (four
    choices each), `qa_target`, `qar_target`, and `img_fname` (its ground-truth and detected
    boxes' img_db keys)."""
    where = f"{db.path}: key {key!r}"
    choices = []
    for name in ("input_ids_as", "input_ids_rs"):
        given = record.get(name)
        if (
            not isinstance(given, list)
            or len(given) != CHOICES
            or not all(isinstance(c, list) and all(isinstance(i, int) for i in c) for c in given)
        ):
            raise VLPruneError(f"{where}: {name!r} should hold {CHOICES} lists of token ids")
        choices.append(tuple((*c, db.vocabulary.sep) for c in given))
    labels = [record.get(name) for name in ("qa_target", "qar_target")]
    if not all(isinstance(label, int) and 0 <= label < CHOICES for label in labels):
        raise VLPruneError(f"{where}: 'qa_target' and 'qar_target' should be choices 0…3")
    images = tuple(image_names(record, 2, where))
    question = db.with_specials(record["input_ids"])
    return VcrExample(key, question, choices[0], choices[1], labels[0], labels[1], images)


def accuracies(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """VCR's three accuracies of B × 2 (answer, rationale) choices: Q→A, QA→R (the rationale
    chosen given the right answer) and Q→AR (both right)."""
    right = predictions == targets
    return {
        "q_a": right[:, 0].float().mean().item(),
        "qa_r": right[:, 1].float().mean().item(),
        "q_ar": right.all(-1).float().mean().item(),
    }


def text(tokens: list[Any], objects: list[str], where: str) -> str:
    """VCR tokens as one string, each object reference replaced by the class names of the
    objects it lists, joined by "and"."""
    words = []
    for i, token in enumerate(tokens):
        if isinstance(token, str):
            words.append(token)
            continue
        if not isinstance(token, list) or not token or not all(_is_index(k) for k in token):
            raise VLPruneError(
                f"{where}[{i}] should be a word or a list of object indices, got {token!r}"
            )
        for k in token:
            if not 0 <= k < len(objects):
                raise VLPruneError(
                    f"{where}[{i}] refers to object {k}, but 'objects' lists {len(objects)}"
                )
        words.append(" and ".join(objects[k] for k in token))
    return " ".join(words)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choices(record: dict[str, Any], name: str, objects: list[str], where: str) -> tuple[str, ...]:
    choices = field(record, name, list, where)
    if len(choices) != CHOICES:
        raise VLPruneError(f"{where}: field {name!r} has {len(choices)} choices, VCR has {CHOICES}")
    for j, choice in enumerate(choices):
        if not isinstance(choice, list):
            raise VLPruneError(f"{where}: {name}[{j}] should be a list of tokens, got {choice!r}")
    return tuple(text(choice, objects, f"{where}: {name}[{j}]") for j, choice in enumerate(choices))


def _label(record: dict[str, Any], name: str, where: str) -> int:
    label = field(record, name, int, where)
    if not 0 <= label < CHOICES:
        raise VLPruneError(f"{where}: field {name!r} is {label}, not a choice in 0..{CHOICES - 1}")
    return label
