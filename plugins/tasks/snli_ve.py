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

The world's premise images are each one of a pair whose other image is never shown, and every
hypothesis speaks of both: "the image contains a red object and at least one image contains a
circle ." The visible image settles it (entailment or contradiction) or it does not (neutral:
the unseen image decides). Each image gets one hypothesis of each label, as in SNLI, so the
image alone does not tell the label; the words of all three are drawn before the image, and
images until each has its label, so the words alone do not tell it either.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import Task, TaskBatch
from vl_prune_plugins.tasks.annotations import field, json_lines, write_json_lines
from vl_prune_plugins.tasks.inputs import ImageStore, TokenIds, encode
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs
from vl_prune_plugins.tasks.vqa import VqaHead
from vl_prune_plugins.world import VERSION as WORLD_VERSION
from vl_prune_plugins.world.scenes import Scene, WorldSettings

LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
#: the labels of UNITER's VE txt_db targets (its VE_ENT2IDX), and its db names: ve_<split>.db
TXT_DB_LABELS = ("contradiction", "entailment", "neutral")
TXT_DB = "ve"
NO_CONSENSUS = "-"
IGNORE = -100  # the target of a line without a label: no loss, not scored
IMAGE_FIELDS = ("Flikr30kID", "Flickr30K_ID")
#: images per world split; each gets three hypotheses, one of each label
WORLD_SIZES = {"train": 700, "dev": 200}
# Flickr30k ids are numbers; the world numbers each split's images from here.
FIRST_IMAGE = {"train": 1_000_000, "dev": 2_000_000}


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
    world_version = WORLD_VERSION
    # UNITER's train-ve-base-2gpu.json: 4000 steps, peak lr 8e-5, 400 warmup steps, seed 42.
    recipe: ClassVar[dict] = {
        "steps": 4000,
        "lr": 8e-5,
        "warmup": 0.1,
        "batch_size": 32,
        "seed": 42,
    }
    # Every world hypothesis names a shape or colour, which the tiny models learn slowly:
    # uniter-tiny's dense accuracy is 0.378 after 150 steps, 0.430 after 400 (chance 1/3).
    world_recipe: ClassVar[dict] = {"steps": 400, "lr": 1e-3, "batch_size": 32}

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

    @classmethod
    def write_world(cls, out: Path, seed: int = 0) -> None:
        from vl_prune_plugins.world.images import new_scene, scene_rng, write_image
        from vl_prune_plugins.world.language import captions

        settings = WorldSettings(seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        for split, size in WORLD_SIZES.items():
            rng = scene_rng(settings, "snli-ve", split)
            records = []
            for i in range(size):
                # The words of each label's hypothesis are drawn before the image; images are
                # then drawn until every hypothesis has its label (new words now and then: some
                # draws ask for a thing both present and absent).
                for attempt in itertools.count():
                    if attempt % 50 == 0:
                        drawn = {label: Hypothesis.draw(rng, settings) for label in LABELS}
                    scene = new_scene(settings, "snli-ve", split, i, attempt)
                    if all(h.label(scene) == label for label, h in drawn.items()):
                        break
                image = str(FIRST_IMAGE[split] + i)
                write_image(scene, image, out, settings)
                caption = " ".join(captions(scene))
                for label, h in drawn.items():
                    records.append(_record(image, caption, h.text(), label))
            write_json_lines(out / f"snli_ve_{split}.jsonl", records)

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


def _record(image: str, caption: str, hypothesis: str, label: str) -> dict:
    """A line as the SNLI-VE generator writes it: SNLI's fields plus `Flikr30kID`, keys
    sorted. The world has no parser: the parses are flat bracketings of the words."""
    caption_id = f"{image}.jpg#0"
    return {
        "Flikr30kID": f"{image}.jpg",
        "annotator_labels": [label],
        "captionID": caption_id,
        "gold_label": label,
        # SNLI's pair ids: the caption id, the hypothesis round and the label's initial.
        "pairID": f"{caption_id}r1{label[0]}",
        "sentence1": caption,
        "sentence1_binary_parse": _flat(caption),
        "sentence1_parse": f"(ROOT {_flat(caption)})",
        "sentence2": hypothesis,
        "sentence2_binary_parse": _flat(hypothesis),
        "sentence2_parse": f"(ROOT {_flat(hypothesis)})",
    }


def _flat(sentence: str) -> str:
    return f"( {sentence} )"


# Each template is "the image contains A" joined to a claim about B in both images, the shown
# one and the unseen one.
TEMPLATES = (
    # A ∧ (B here ∨ B there): no A contradicts, A and B entail, A alone leaves it open.
    "the image contains {a} and at least one image contains {b} .",
    # A ∨ (B here ∧ B there): A entails, neither contradicts, B alone leaves it open.
    "the image contains {a} or both images contain {b} .",
)


@dataclass(frozen=True)
class Mention:
    """What a hypothesis says an image contains: a shape, or an object of a colour. (No
    numbers of objects: with them, how many objects an image holds would tell the label.)"""

    shape: str | None = None
    colour: str | None = None

    def phrase(self) -> str:
        return f"a {self.shape}" if self.colour is None else f"a {self.colour} object"

    def shown_in(self, scene: Scene) -> bool:
        return scene.count(self.shape, self.colour) > 0


@dataclass(frozen=True)
class Hypothesis:
    """A world hypothesis: one of TEMPLATES and its two different things."""

    template: str
    a: Mention
    b: Mention

    @classmethod
    def draw(cls, rng: random.Random, settings: WorldSettings) -> Hypothesis:
        things = [Mention(shape=s) for s in settings.shape_names]
        things += [Mention(colour=c) for c in settings.colour_names]
        return cls(rng.choice(TEMPLATES), *rng.sample(things, 2))

    def text(self) -> str:
        return self.template.format(a=self.a.phrase(), b=self.b.phrase())

    def label(self, scene: Scene) -> str:
        """What the shown image makes of the hypothesis, whatever the unseen one holds."""
        has_a, has_b = self.a.shown_in(scene), self.b.shown_in(scene)
        if self.template == TEMPLATES[0]:
            if not has_a:
                return "contradiction"
            return "entailment" if has_b else "neutral"
        if has_a:
            return "entailment"
        return "neutral" if has_b else "contradiction"
