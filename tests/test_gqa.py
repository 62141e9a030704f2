"""GQA: the readers of the release's and LXMERT's layouts, their errors, the metric, the world's
questions and split, batches for every tiny backbone, and a few training steps."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from task_checks import train_briefly, written_twice

import vl_prune_plugins.tasks.gqa as gqa
import vl_prune_plugins.world.splits.gqa as gqa_world
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.gqa import Gqa, GqaExample
from vl_prune_plugins.world.scenes import Scene, Thing, WorldSettings
from vl_prune_plugins.world.splits.gqa import SPLIT
from vl_prune_plugins.world.vocabulary import SHAPES, plural, words

# The keys of a question of the release's testdev_balanced_questions.json, in its order.
OFFICIAL_FIELDS = [
    "semantic",
    "entailed",
    "equivalent",
    "question",
    "imageId",
    "isBalanced",
    "groups",
    "answer",
    "semanticStr",
    "annotations",
    "types",
    "fullAnswer",
]
WORLD = {"train": 200, "testdev": 60}


def question(text: str, image: str, answer: str) -> dict:
    """A question in the release's layout, with a made-up program."""
    return {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "fence (-) "}],
        "entailed": [],
        "equivalent": ["201307270"],
        "question": text,
        "imageId": image,
        "isBalanced": True,
        "groups": {"global": None, "local": "09existOr-fence_snowboard"},
        "answer": answer,
        "semanticStr": "select: fence (-) ->exist: ?",
        "annotations": {"answer": {}, "question": {"7": "1"}, "fullAnswer": {"4": "1"}},
        "types": {"detailed": "existOr", "semantic": "obj", "structural": "logical"},
        "fullAnswer": f"{answer.capitalize()}.",
    }


RELEASE = {
    "201307270": question("Is there either a fence or a snowboard?", "n161313", "yes"),
    "201640614": question("Who is wearing the dress?", "n235859", "women"),
}
LXMERT = [
    {"img_id": "n161313", "label": {"no": 1.0}, "question_id": "201307251", "sent": "Is it?"},
    {
        "img_id": "n235859",
        "label": {"man": 0.4, "women": 1.0, "woman": 1.0},
        "question_id": "201640614",
        "sent": "Who is wearing the dress?",
    },
]


@pytest.fixture
def data(tmp_path) -> Path:
    """Image n161313 has region features, n235859 only a PNG."""
    rng = np.random.default_rng(0)
    (tmp_path / "features").mkdir()
    (tmp_path / "images").mkdir()
    xy = rng.uniform(0, 0.5, (3, 2))
    np.savez_compressed(
        tmp_path / "features" / "n161313.npz",
        features=rng.standard_normal((3, 64)).astype(np.float16),
        norm_bb=np.concatenate([xy, xy + 0.2, np.full((3, 2), 0.2)], 1).astype(np.float32),
        conf=rng.uniform(0.2, 1, 3).astype(np.float32),
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "n235859.png")
    return tmp_path


def write(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=4))


def test_reads_the_release_layout(data):
    write(data / "train_balanced_questions.json", RELEASE)
    task = Gqa(data)
    assert task.examples("train") == [
        GqaExample("201307270", "Is there either a fence or a snowboard?", "n161313", "yes"),
        GqaExample("201640614", "Who is wearing the dress?", "n235859", "women"),
    ]
    assert task.answers == ["women", "yes"]


def test_reads_lxmert_layout_with_the_top_scoring_label_as_gold(data):
    write(data / "testdev.json", LXMERT)
    examples = Gqa(data).examples("testdev")
    assert examples == [
        GqaExample("201307251", "Is it?", "n161313", "no"),
        GqaExample("201640614", "Who is wearing the dress?", "n235859", "women"),
    ]


def test_the_release_file_wins_and_a_missing_split_names_both_files(data):
    write(data / "testdev_balanced_questions.json", RELEASE)
    write(data / "testdev.json", LXMERT)
    assert Gqa(data).examples("testdev")[0].answer == "yes"
    with pytest.raises(VLPruneError, match=r"val_balanced_questions\.json .* val\.json"):
        Gqa(data).examples("val")


def release_without(key: str) -> dict:
    record = {k: v for k, v in RELEASE["201640614"].items() if k != key}
    return {**RELEASE, "201640614": record}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("testdev_balanced_questions.json", release_without("answer"), "field 'answer'"),
        (
            "testdev_balanced_questions.json",
            {"1": question("Is it?", "n999", "no")},
            "image n999 is missing",
        ),
        ("testdev.json", [LXMERT[0], {**LXMERT[1], "label": {}}], "label is empty"),
        ("testdev.json", [LXMERT[0], {**LXMERT[1], "question_id": 7}], "should be str"),
        ("testdev.json", [LXMERT[0], {**LXMERT[1], "label": {"a": "1"}}], "'a' has score '1'"),
        ("testdev.json", [LXMERT[0], LXMERT[0]], "201307251 appears twice"),
        ("testdev.json", RELEASE, "expected a JSON list"),
    ],
    ids=["no-answer", "missing-image", "empty-label", "int-id", "text-score", "twice", "dict"],
)
def test_bad_records_are_errors_naming_file_and_record(data, name, content, message):
    write(data / name, content)
    with pytest.raises(VLPruneError, match=message) as error:
        Gqa(data).examples("testdev")
    text = str(error.value)
    assert text.startswith(f"{data / name}: ")
    if name == "testdev.json" and isinstance(content, list):
        assert text.startswith(f"{data / name}: [1]")


def test_malformed_json_names_file_and_line(data):
    (data / "testdev.json").write_text('[\n  {"img_id": "n161313",\n')
    with pytest.raises(VLPruneError, match=rf"^{data / 'testdev.json'}:\d+: not valid JSON"):
        Gqa(data).examples("testdev")


def test_accuracy_and_loss_by_hand(data):
    """Accuracy is argmax == gold; a gold answer the training split never gave is wrong and
    adds nothing to the loss."""
    write(data / "train_balanced_questions.json", RELEASE)
    write(data / "testdev.json", LXMERT)
    shutil.copy(data / "features" / "n161313.npz", data / "features" / "n235859.npz")
    task = Gqa(data)
    backbone = Uniter.build("tiny")
    targets = task.collate(task.examples("testdev"), backbone).targets
    assert targets.tolist() == [gqa.IGNORE, 0]  # "no" is no training answer; "women" is 0
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    assert task.score(task.predict(logits), targets) == 0.5
    assert task.score(torch.tensor([1, 0, 0, 1]), torch.tensor([1, 1, 0, gqa.IGNORE])) == 0.5
    expected = -torch.log_softmax(logits[1], -1)[0]
    torch.testing.assert_close(task.loss(logits, targets), expected)


SCENE = Scene(
    (
        Thing("circle", "red", "small", 0.15, 0.6),
        Thing("circle", "blue", "large", 0.85, 0.6),
        Thing("square", "red", "small", 0.4, 0.15),
        Thing("square", "green", "large", 0.6, 0.9),
    )
)
SETTINGS = WorldSettings()
SINGULAR = {plural(shape): shape for shape in SHAPES}


def referent(phrase: str) -> Thing:
    """The one object of SCENE a phrase of the world's questions names."""
    if m := re.fullmatch(r"the (\w+) on the (left|right)", phrase):
        same = sorted((t for t in SCENE.things if t.shape == m[1]), key=lambda t: t.x)
        return same[0 if m[2] == "left" else -1]
    if m := re.fullmatch(r"the (\w+) object", phrase):
        (thing,) = (t for t in SCENE.things if t.colour == m[1])
        return thing
    *colour, shape = phrase.removeprefix("the ").split()
    (thing,) = (t for t in SCENE.things if t.matches(shape, colour[0] if colour else None))
    return thing


def answer_of(text: str) -> str:
    """The answer to a world question, recomputed from SCENE for each of its forms."""
    yes_no = {True: "yes", False: "no"}
    if m := re.fullmatch(r"what colour is (.+) \?", text):
        return referent(m[1]).colour
    if m := re.fullmatch(r"what shape is (.+) \?", text):
        return referent(m[1]).shape
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", text):
        return yes_no[SCENE.count(m[2], m[1]) > 0]
    if m := re.fullmatch(r"are there both (\w+) and (\w+) objects \?", text):
        return yes_no[SCENE.count(colour=m[1]) > 0 and SCENE.count(colour=m[2]) > 0]
    if m := re.fullmatch(r"are there any (\w+) or (\w+) \?", text):
        return yes_no[SCENE.count(SINGULAR[m[1]]) + SCENE.count(SINGULAR[m[2]]) > 0]
    if m := re.fullmatch(r"are (.+) and (.+) the same colour \?", text):
        return yes_no[referent(m[1]).colour == referent(m[2]).colour]
    if m := re.fullmatch(r"is (.+) (to the left of|to the right of|above|below) (.+) \?", text):
        a, b = referent(m[1]), referent(m[3])
        holds = {
            "to the left of": a.x < b.x,
            "to the right of": a.x > b.x,
            "above": a.y < b.y,
            "below": a.y > b.y,
        }
        return yes_no[holds[m[2]]]
    if m := re.fullmatch(r"is (.+) (\w+) or (\w+) \?", text):
        colour = referent(m[1]).colour
        assert colour in (m[2], m[3])
        return colour
    raise AssertionError(f"no form matches {text!r}")


@pytest.mark.parametrize("family", gqa_world.FAMILIES, ids=lambda f: f.__name__)
def test_world_questions_answer_what_the_scene_shows(family):
    vocabulary = set(words())
    rng = random.Random(0)
    answers = set()
    for _ in range(40):
        for yes in (True, False):
            asked = family(SCENE, rng, SETTINGS, yes)
            assert asked is not None
            text, answer = asked
            assert set(text.split()) <= vocabulary
            assert answer_of(text) == answer, text
            answers.add(answer)
    assert len(answers) >= 2


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gqa-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gqa_world, "WORLD_SIZES", WORLD)
        SPLIT.write(root, 0)
    return root


def test_world_split_round_trip(world):
    task = Gqa(world)
    for split, size in WORLD.items():
        examples = task.examples(split)
        assert len(examples) == size
        records = json.loads((world / f"{split}_balanced_questions.json").read_text())
        assert all(list(record) == OFFICIAL_FIELDS for record in records.values())
        assert all((world / "features" / f"{e.image}.npz").is_file() for e in examples)
        yes_no = [e.answer for e in examples if e.answer in ("yes", "no")]
        assert 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    assert task.examples("testdev")[0].image.startswith("n")
    assert {"yes", "no", *SETTINGS.colour_names, *SETTINGS.shape_names} == set(task.answers)


def test_the_same_seed_writes_the_same_world(tmp_path, monkeypatch):
    monkeypatch.setattr(gqa_world, "WORLD_SIZES", {"train": 4, "testdev": 2})
    assert len(written_twice(SPLIT, tmp_path, seed=5)) == 2 + 2 * 3


@pytest.mark.parametrize("backbone", [Uniter, Lxmert, Vilt])
def test_collate_forward_and_loss(world, backbone):
    torch.manual_seed(0)
    model = backbone.build("tiny")
    task = Gqa(world)
    head = task.head(model)
    batch = task.collate(task.examples("testdev")[:4], model)
    logits = VLModel(model, head)(batch)
    assert logits.shape == (4, len(task.answers))
    loss = task.loss(logits, batch.targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())


def test_a_few_training_steps_through_vl_prune_train(world):
    task = Gqa(world)
    assert 0.0 <= train_briefly(task, task.examples("testdev")[:16], steps=3) <= 1.0
