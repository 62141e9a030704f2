"""SNLI-VE: the reader on the release's JSON lines, its errors, the metric, the soundness of the
world's hypotheses (neutral really is undecidable), its split, and batches and a few steps."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from task_checks import train_briefly, written_twice

import vl_prune_plugins.world.splits.snli_ve as snli_ve_world
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.snli_ve import SnliVe, SnliVeExample
from vl_prune_plugins.world.scenes import Scene, WorldSettings, sample_scene
from vl_prune_plugins.world.splits.snli_ve import SPLIT, Hypothesis
from vl_prune_plugins.world.vocabulary import words

# The keys of a line of the release, sorted as its generator writes them.
OFFICIAL_FIELDS = [
    "Flikr30kID",
    "annotator_labels",
    "captionID",
    "gold_label",
    "pairID",
    "sentence1",
    "sentence1_binary_parse",
    "sentence1_parse",
    "sentence2",
    "sentence2_binary_parse",
    "sentence2_parse",
]
WORLD = {"train": 200, "dev": 60}


def line(image: str, hypothesis: str, gold: str, suffix: str = "e") -> dict:
    """A line in the release's layout, with made-up parses."""
    return {
        "Flikr30kID": f"{image}.jpg",
        "annotator_labels": [gold],
        "captionID": f"{image}.jpg#2",
        "gold_label": gold,
        "pairID": f"{image}.jpg#2r1{suffix}",
        "sentence1": "A man taking his son's bicycle to a repair shop.",
        "sentence1_binary_parse": "( ( A man ) ( taking bicycle ) )",
        "sentence1_parse": "(ROOT (NP (NP (DT A) (NN man))))",
        "sentence2": hypothesis,
        "sentence2_binary_parse": "( ( A man ) walking )",
        "sentence2_parse": "(ROOT (NP (DT A) (NN man)))",
    }


def write_lines(path: Path, records: list) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))


@pytest.fixture
def data(tmp_path) -> Path:
    """Image 555378351 has region features, 3253523210 only a PNG."""
    rng = np.random.default_rng(0)
    (tmp_path / "features").mkdir()
    (tmp_path / "images").mkdir()
    xy = rng.uniform(0, 0.5, (3, 2))
    np.savez_compressed(
        tmp_path / "features" / "555378351.npz",
        features=rng.standard_normal((3, 64)).astype(np.float16),
        norm_bb=np.concatenate([xy, xy + 0.2, np.full((3, 2), 0.2)], 1).astype(np.float32),
        conf=rng.uniform(0.2, 1, 3).astype(np.float32),
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "3253523210.png")
    return tmp_path


def test_reads_the_release_and_skips_lines_without_consensus(data):
    xvnli = {  # XVNLI's reduced line: Flickr30K_ID-less copies name the image without ".jpg"
        "gold_label": "contradiction",
        "sentence1": "A man.",
        "sentence2": "He sleeps.",
        "captionID": "555378351.jpg#2",
        "pairID": "555378351.jpg#2r1c",
        "Flickr30K_ID": "555378351",
    }
    write_lines(
        data / "snli_ve_dev.jsonl",
        [
            line("555378351", "A man walking with his son's bike.", "entailment"),
            line("3253523210", "People talk.", "-", "n"),
            line("3253523210", "Three people talk.", "neutral", "n"),
            xvnli,
        ],
    )
    assert SnliVe(data).examples("dev") == [
        SnliVeExample("555378351.jpg#2r1e", "A man walking with his son's bike.", "555378351", 0),
        SnliVeExample("3253523210.jpg#2r1n", "Three people talk.", "3253523210", 1),
        SnliVeExample("555378351.jpg#2r1c", "He sleeps.", "555378351", 2),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"gold_label": "neutral",\n', "not valid JSON"),
        (line("555378351", "A man.", "maybe"), "gold_label 'maybe' is not one of"),
        ({**line("555378351", "A man.", "neutral"), "sentence2": None}, "'sentence2' should"),
        (
            {k: v for k, v in line("555378351", "A man.", "neutral").items() if k != "Flikr30kID"},
            "field 'Flikr30kID' .* is missing",
        ),
        (line("123", "A man.", "neutral"), "image 123 is missing"),
    ],
    ids=["not-json", "label-maybe", "null-hypothesis", "no-image-field", "missing-image"],
)
def test_bad_lines_are_errors_naming_file_and_line(data, bad, message):
    good = line("555378351", "A man.", "entailment")
    write_lines(data / "snli_ve_train.jsonl", [good, bad, good])
    with pytest.raises(VLPruneError, match=rf"^{data / 'snli_ve_train.jsonl'}:2: .*{message}"):
        SnliVe(data).examples("train")


def test_a_split_of_only_unlabelled_lines_is_an_error(data):
    write_lines(data / "snli_ve_test.jsonl", [line("555378351", "A man.", "-")])
    with pytest.raises(VLPruneError, match="no labelled hypotheses"):
        SnliVe(data).examples("test")


def test_accuracy_and_loss_by_hand(data):
    task = SnliVe(data)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 2, 1])
    assert task.score(task.predict(logits), targets) == 0.5
    expected = -torch.log_softmax(logits, -1)[torch.arange(4), targets].mean()
    torch.testing.assert_close(task.loss(logits, targets), expected)


def truth(text: str, shown: Scene, unseen: Scene) -> bool:
    """The truth of a world hypothesis about the pair (shown image, unseen image), recomputed
    from the sentence: what it asserts, not how the writer labelled it."""

    def has(scene: Scene, phrase: str) -> bool:
        if m := re.fullmatch(r"a (\w+) object", phrase):
            return scene.count(colour=m[1]) > 0
        return scene.count(phrase.removeprefix("a ")) > 0

    if m := re.fullmatch(r"the image contains (.+) and at least one image contains (.+) \.", text):
        return has(shown, m[1]) and (has(shown, m[2]) or has(unseen, m[2]))
    if m := re.fullmatch(r"the image contains (.+) or both images contain (.+) \.", text):
        return has(shown, m[1]) or (has(shown, m[2]) and has(unseen, m[2]))
    raise AssertionError(f"no template matches {text!r}")


@pytest.mark.parametrize("settings", [WorldSettings(), WorldSettings(shapes=8, colours=8)])
def test_labels_are_what_every_possible_unseen_image_agrees_on(settings):
    """Entailed: true whatever the unseen image holds; contradicted: false whatever it holds;
    neutral: true with some unseen images and false with others."""
    rng = random.Random(0)
    unseen = [sample_scene(rng, settings) for _ in range(300)]
    vocabulary = set(words())
    labels = Counter()
    for _ in range(300):
        shown, hypothesis = sample_scene(rng, settings), Hypothesis.draw(rng, settings)
        text = hypothesis.text()
        assert set(text.split()) <= vocabulary
        truths = {truth(text, shown, other) for other in unseen}
        label = hypothesis.label(shown)
        labels[label] += 1
        expected = {"entailment": {True}, "contradiction": {False}, "neutral": {True, False}}
        assert truths == expected[label], (text, shown)
    assert min(labels.values()) > 20


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("snli-ve-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snli_ve_world, "WORLD_SIZES", WORLD)
        SPLIT.write(root, 0)
    return root


def test_world_split_round_trip(world):
    task = SnliVe(world)
    for split, images in WORLD.items():
        examples = task.examples(split)
        assert len(examples) == 3 * images
        # One hypothesis of each label per image: the image alone says nothing of the label.
        per_image = {}
        for e in examples:
            per_image.setdefault(e.image, []).append(e.label)
        assert len(per_image) == images
        assert all(sorted(labels) == [0, 1, 2] for labels in per_image.values())
        assert all((world / "features" / f"{image}.npz").is_file() for image in per_image)
        records = [json.loads(text) for text in (world / f"snli_ve_{split}.jsonl").open()]
        assert all(list(record) == OFFICIAL_FIELDS for record in records)
        assert all(record["Flikr30kID"].endswith(".jpg") for record in records)


def test_hypotheses_alone_do_not_give_the_label_away(world):
    """The majority training label of each hypothesis, read without its image, must be no
    better than chance (1/3) on dev."""
    task = SnliVe(world)
    votes = {}
    for e in task.examples("train"):
        votes.setdefault(e.hypothesis, Counter())[e.label] += 1
    dev = task.examples("dev")
    guessed = [
        e.hypothesis in votes and votes[e.hypothesis].most_common(1)[0][0] == e.label for e in dev
    ]
    assert sum(guessed) / len(guessed) < 0.45


def test_the_same_seed_writes_the_same_world(tmp_path, monkeypatch):
    monkeypatch.setattr(snli_ve_world, "WORLD_SIZES", {"train": 3, "dev": 2})
    assert len(written_twice(SPLIT, tmp_path, seed=5)) == 2 + 2 * 5


@pytest.mark.parametrize("backbone", [Uniter, Lxmert, Vilt])
def test_collate_forward_and_loss(world, backbone):
    torch.manual_seed(0)
    model = backbone.build("tiny")
    task = SnliVe(world)
    head = task.head(model)
    examples = task.examples("dev")[:4]
    batch = task.collate(examples, model)
    assert batch.targets.tolist() == [e.label for e in examples]
    logits = VLModel(model, head)(batch)
    assert logits.shape == (4, 3)
    loss = task.loss(logits, batch.targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())


def test_a_few_training_steps_through_vl_prune_train(world):
    task = SnliVe(world)
    assert 0.0 <= train_briefly(task, task.examples("dev")[:16], steps=3) <= 1.0
