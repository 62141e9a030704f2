"""VQA v2: the official-format reader, soft-score targets, the metric, the world and training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import vl_prune_plugins.tasks.vqa as vqa
import vl_prune_plugins.world.splits.vqa as vqa_world
from vl_prune import registry
from vl_prune.errors import VLPruneError
from vl_prune.task import DataOptions, VLModel
from vl_prune_plugins.tasks.vqa import Vqa
from vl_prune_plugins.world.splits.vqa import SPLIT

LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 International License",
}
INFO = {
    "description": "This is v2.0 of the VQA dataset.",
    "url": "http://visualqa.org",
    "version": "2.0",
    "year": 2017,
    "contributor": "VQA Team",
    "date_created": "2017-04-26 17:00:44",
}


def annotation(question_id: int, image_id: int, answers: list[str], answer_type: str) -> dict:
    return {
        "question_type": "how many",
        "multiple_choice_answer": max(set(answers), key=answers.count),
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": j}
            for j, answer in enumerate(answers, 1)
        ],
        "image_id": image_id,
        "answer_type": answer_type,
        "question_id": question_id,
    }


def release() -> tuple[dict, dict]:
    """Questions and annotations of three questions on two images, as VQA v2 ships them."""
    questions = {
        "info": INFO,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": LICENSE,
        "data_subtype": "train2014",
        "questions": [
            {"image_id": 262148, "question": "How many dogs?", "question_id": 262148000},
            {"image_id": 262148, "question": "Is it sunny?", "question_id": 262148001},
            {"image_id": 393225, "question": "What is in the bowl?", "question_id": 393225000},
        ],
    }
    annotations = {
        "info": INFO,
        "license": LICENSE,
        "data_subtype": "train2014",
        "annotations": [
            annotation(262148000, 262148, ["two"] * 3 + ["three"] + ["four"] * 6, "number"),
            annotation(262148001, 262148, ["Yes"] * 9 + ["no."], "yes/no"),
            annotation(393225000, 393225, ["soup"] * 8 + [" Noodles "] * 2, "other"),
        ],
    }
    return questions, annotations


def write_release(root: Path, questions: dict, annotations: dict) -> None:
    """The two files of the questions' subtype, with region features for each image."""
    subtype = questions["data_subtype"]
    (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(questions))
    (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(annotations))
    (root / "features").mkdir(exist_ok=True)
    for image_id in {q["image_id"] for q in questions["questions"]}:
        np.savez(
            root / "features" / f"COCO_{subtype}_{image_id:012d}.npz",
            features=np.ones((3, 64), np.float16),
            norm_bb=np.full((3, 6), 0.5, np.float32),
            conf=np.ones(3, np.float32),
        )


def real_task(root: Path, answers: list[str] | None = None) -> Vqa:
    """The task on a release folder, with `answers` as its --answer-vocab file."""
    options = DataOptions()
    if answers is not None:
        (root / "answers.json").write_text(json.dumps({a: i for i, a in enumerate(answers)}))
        options = DataOptions(answer_vocab=str(root / "answers.json"))
    return Vqa(root, options)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vqa_world, "WORLD_SIZES", {"train": 600, "dev": 200})
        SPLIT.write(root, 0)
    return root


def test_reads_the_official_layout(tmp_path):
    write_release(tmp_path, *release())
    task = real_task(tmp_path)
    assert task.default_splits() == ("train2014", "val2014")
    examples = task.examples("train2014")
    assert [e.question_id for e in examples] == [262148000, 262148001, 393225000]
    assert examples[0].question == "How many dogs?"
    assert examples[0].image == "COCO_train2014_000000262148"
    assert examples[2].image == "COCO_train2014_000000393225"
    # Answers as VQA's evaluation compares them: lowercase, no punctuation, numbers as digits.
    assert dict(examples[1].scores) == {"yes": 1.0, "no": pytest.approx(0.3)}
    assert dict(examples[0].scores).keys() == {"2", "3", "4"}


def test_the_release_splits_and_uniters_vocabulary_rule(tmp_path):
    """train2014 and val2014 are found; the vocabulary is the majority answers given on at
    least nine questions of both splits, as BUTD's and UNITER's 3,129."""
    questions, annotations = release()
    for k in range(9):  # nine more questions whose majority answer is "red"
        question_id = 393225001 + k
        questions["questions"].append(
            {"image_id": 393225, "question": "What colour?", "question_id": question_id}
        )
        annotations["annotations"].append(annotation(question_id, 393225, ["Red."] * 10, "other"))
    write_release(tmp_path, questions, annotations)
    dev, dev_annotations = release()
    dev["data_subtype"] = dev_annotations["data_subtype"] = "val2014"
    write_release(tmp_path, dev, dev_annotations)
    task = Vqa(tmp_path)
    assert task.default_splits() == ("train2014", "val2014")
    assert task.vocabulary() == ["red"]


def test_targets_are_official_vqa_scores(tmp_path):
    """min(#annotators / 3, 1) averaged over the ten leave-one-out subsets: 0.3, 0.6, 0.9, 1."""
    write_release(tmp_path, *release())
    task = real_task(tmp_path, ["2", "3", "4", "no", "noodles", "soup", "yes"])
    backbone = registry.load("backbones", "uniter").build("tiny")
    batch = task.collate(task.examples("train2014"), backbone)
    expected = {
        0: {"2": 0.9, "3": 0.3, "4": 1.0},
        1: {"yes": 1.0, "no": 0.3},
        2: {"soup": 1.0, "noodles": 0.6},
    }
    for row, scores in expected.items():
        want = torch.tensor([scores.get(answer, 0.0) for answer in task.answers])
        torch.testing.assert_close(batch.targets[row], want)


def test_answers_outside_the_vocabulary_get_no_target(tmp_path):
    train, annotations = release()
    write_release(tmp_path, train, annotations)
    dev, dev_annotations = release()
    dev["data_subtype"] = dev_annotations["data_subtype"] = "val2014"
    dev_annotations["annotations"][0]["answers"][0]["answer"] = "seven"
    write_release(tmp_path, dev, dev_annotations)
    task = real_task(tmp_path, ["2", "no", "yes"])
    backbone = registry.load("backbones", "uniter").build("tiny")
    batch = task.collate(task.examples("val2014"), backbone)
    assert batch.targets.shape == (3, 3)
    assert batch.targets[0, 0].item() == pytest.approx(0.6)  # "two" twice of ten
    assert batch.targets[2].sum() == 0  # soup and noodles are no answers of the head


def test_an_answer_vocabulary_file_in_each_accepted_form(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["b", "a"]))
    (tmp_path / "index.json").write_text(json.dumps({"a": 1, "b": 0}))
    (tmp_path / "gap.json").write_text(json.dumps({"a": 0, "b": 2}))
    assert vqa.read_answer_vocab(tmp_path / "list.json") == ["b", "a"]
    assert vqa.read_answer_vocab(tmp_path / "index.json") == ["b", "a"]
    with pytest.raises(VLPruneError, match=r"gap\.json: expected \{answer: index\}"):
        vqa.read_answer_vocab(tmp_path / "gap.json")


def test_score_is_the_target_score_of_the_predicted_answer(tmp_path):
    task = Vqa(tmp_path)
    targets = torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 2 / 3, 1.0], [1 / 3, 0.0, 1.0]])
    predictions = task.predict(torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 2.0, 1.0]]))
    assert predictions.tolist() == [0, 1, 1]
    assert task.score(predictions, targets) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_loss_is_uniter_scaled_binary_cross_entropy(tmp_path):
    task = Vqa(tmp_path)
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1 / 3, 0.0]])
    per_answer = [
        torch.nn.functional.binary_cross_entropy_with_logits(logits[0, i], targets[0, i])
        for i in range(4)
    ]
    torch.testing.assert_close(task.loss(logits, targets), torch.stack(per_answer).sum())


QUESTIONS = "v2_OpenEnded_mscoco_train2014_questions.json"
ANNOTATIONS = "v2_mscoco_train2014_annotations.json"


@pytest.mark.parametrize(
    ("change", "named", "message"),
    [
        (
            lambda q, a: a["annotations"][1].pop("answers"),
            ANNOTATIONS,
            r"annotations\[1\] \(question_id 262148001\): field 'answers' is missing",
        ),
        (
            lambda q, a: a["annotations"].pop(2),
            QUESTIONS,
            f"question_id 393225000: no annotation in .*{ANNOTATIONS}",
        ),
        (
            lambda q, a: q["questions"].pop(2),
            ANNOTATIONS,
            f"question_id 393225000 has no question in .*{QUESTIONS}",
        ),
        (
            lambda q, a: a["annotations"][0]["answers"].pop(9),
            ANNOTATIONS,
            r"question_id 262148000\): 9 answers, VQA v2 has 10",
        ),
        (
            lambda q, a: a["annotations"][0]["answers"][3].update(answer=2),
            ANNOTATIONS,
            r"answers\[3\]: field 'answer' should be str, got 2",
        ),
        (
            lambda q, a: q["questions"][1].pop("question_id"),
            QUESTIONS,
            r"questions\[1\]: field 'question_id' is missing",
        ),
    ],
)
def test_bad_annotations_are_errors_naming_the_file(tmp_path, change, named, message):
    questions, annotations = release()
    change(questions, annotations)
    write_release(tmp_path, questions, annotations)
    with pytest.raises(VLPruneError, match=message) as error:
        real_task(tmp_path).examples("train2014")
    assert str(error.value).startswith(f"{tmp_path / named}: ")


def test_malformed_json_is_an_error_naming_the_file(tmp_path):
    write_release(tmp_path, *release())
    path = tmp_path / ANNOTATIONS
    path.write_text(path.read_text()[:-20])
    with pytest.raises(VLPruneError, match="not valid JSON") as error:
        real_task(tmp_path).examples("train2014")
    assert str(error.value).startswith(str(path))


def test_a_missing_image_is_an_error_naming_it(tmp_path):
    write_release(tmp_path, *release())
    (tmp_path / "features" / "COCO_train2014_000000393225.npz").unlink()
    with pytest.raises(VLPruneError, match=r"features/COCO_train2014_000000393225\.npz") as error:
        real_task(tmp_path).examples("train2014")
    assert "v2_OpenEnded_mscoco_train2014_questions.json: question_id 393225000" in str(error.value)


def test_world_splits_read_back(world):
    task = Vqa(world)
    backbone = registry.load("backbones", "uniter").build("tiny")
    for split, size in (("train", 600), ("dev", 200)):
        examples = task.examples(split)
        assert len(examples) == size
        for example in examples:
            assert (world / "images" / f"{example.image}.png").is_file()
            assert (world / "features" / f"{example.image}.npz").is_file()
        targets = task.collate(examples, backbone).targets
        assert targets.shape == (size, len(task.answers))
        if split == "train":
            assert (targets.max(dim=1).values > 0).all()
    questions = json.loads((world / "v2_OpenEnded_mscoco_dev_questions.json").read_text())
    assert questions["data_subtype"] == "dev"
    assert [q["question_id"] for q in questions["questions"][:3]] == [1000, 1001, 2000]


def test_the_same_seed_writes_the_same_world(tmp_path, monkeypatch):
    monkeypatch.setattr(vqa_world, "WORLD_SIZES", {"train": 6, "dev": 4})
    SPLIT.write(tmp_path / "a", 3)
    SPLIT.write(tmp_path / "b", 3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 4 + 2 * (3 + 2)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("name", ["uniter", "lxmert", "vilt"])
def test_collate_forward_and_loss(world, name):
    task = Vqa(world)
    torch.manual_seed(0)
    backbone = registry.load("backbones", name).build("tiny")
    model = VLModel(backbone, task.head(backbone))
    batch = task.collate(task.examples("dev")[:4], backbone)
    logits = model(batch)
    assert logits.shape == (4, len(task.answers))
    loss = task.loss(logits, batch.targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.head.classifier[-1].weight.grad is not None


def test_training_beats_the_best_single_answer(world, one_thread):
    """A tiny UNITER fine-tuned for a few hundred steps must clearly beat answering every dev
    question with the one answer that scores best on dev (a loose floor, not a benchmark)."""
    task = Vqa(world)
    train, dev = task.examples("train"), task.examples("dev")
    torch.manual_seed(0)
    backbone = registry.load("backbones", "uniter").build("tiny")
    model = VLModel(backbone, task.head(backbone))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    draw = random.Random(0)
    for _ in range(200):
        batch = task.collate(draw.sample(train, 32), backbone)
        loss = task.loss(model(batch), batch.targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        batch = task.collate(dev, backbone)
        score = task.score(task.predict(model(batch)), batch.targets)
    baseline = batch.targets.mean(dim=0).max().item()
    assert score > baseline + 0.1, (score, baseline)
