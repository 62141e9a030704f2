"""VCR: the reader on the release's JSON lines and its errors, the metric and loss, the world's
split (read back, true choices, no text prior), batches for every tiny backbone, and training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from task_checks import written_twice

import vl_prune_plugins.world.splits.vcr as vcr_world
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune.train import TrainSettings, evaluate, fit, make_accelerator
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.vcr import Vcr, VcrExample, accuracies
from vl_prune_plugins.world.commonsense import commonsense_question
from vl_prune_plugins.world.images import new_scene, scene_rng
from vl_prune_plugins.world.scenes import WorldSettings
from vl_prune_plugins.world.splits.vcr import SPLIT

# The keys of a line of the release's val.jsonl, in its order.
OFFICIAL_FIELDS = [
    "movie",
    "objects",
    "interesting_scores",
    "answer_likelihood",
    "img_fn",
    "metadata_fn",
    "answer_orig",
    "question_orig",
    "rationale_orig",
    "question",
    "answer_match_iter",
    "answer_sources",
    "answer_choices",
    "answer_label",
    "rationale_choices",
    "rationale_sources",
    "rationale_match_iter",
    "rationale_label",
    "img_id",
    "question_number",
    "annot_id",
    "match_fold",
    "match_index",
]
WORLD = {"train": 160, "val": 80}
MOVIE = "lsmdc_3001_21_JUMP_STREET"


def line(annot_id: str, image: str, **changes) -> dict:
    """A record in the release's layout (made-up text about a made-up movie still)."""
    record = {
        "movie": "3001_21_JUMP_STREET",
        "objects": ["person", "person", "car"],
        "interesting_scores": [0],
        "answer_likelihood": "likely",
        "img_fn": f"{MOVIE}/{image}.jpg",
        "metadata_fn": f"{MOVIE}/{image}.json",
        "answer_orig": "2 is driving 3.",
        "question_orig": "What is 2 doing?",
        "rationale_orig": "2 sits behind the wheel of 3.",
        "question": ["What", "is", [1], "doing", "?"],
        "answer_match_iter": [3, 0, 2, 1],
        "answer_sources": [1200, 88, 1, 4071],
        "answer_choices": [
            [[0], "is", "running", "."],
            [[1], "is", "driving", [2], "."],
            [[0, 1], "are", "talking", "."],
            [[1], "is", "asleep", "."],
        ],
        "answer_label": 1,
        "rationale_choices": [
            [[1], "sits", "behind", "the", "wheel", "of", [2], "."],
            [[0], "is", "holding", "a", "cup", "."],
            ["It", "is", "night", "."],
            [[2], "is", "parked", "."],
        ],
        "rationale_sources": [1, 912, 77, 3045],
        "rationale_match_iter": [0, 3, 1, 2],
        "rationale_label": 0,
        "img_id": f"val-{image}",
        "question_number": 1,
        "annot_id": annot_id,
        "match_fold": "val-0",
        "match_index": 1,
    }
    record.update(changes)
    return record


def write_lines(path: Path, records: list) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))


@pytest.fixture
def data(tmp_path) -> Path:
    """val.jsonl of two lines: still 3001_00.01.02@0 has region features, 3001_00.05.09@2 only a
    PNG."""
    (tmp_path / "features").mkdir()
    (tmp_path / "images").mkdir()
    np.savez(
        tmp_path / "features" / "3001_00.01.02@0.npz",
        features=np.ones((3, 64), np.float16),
        norm_bb=np.full((3, 6), 0.5, np.float32),
        conf=np.ones(3, np.float32),
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "3001_00.05.09@2.png")
    write_lines(
        tmp_path / "val.jsonl",
        [line("val-1", "3001_00.01.02@0"), line("val-2", "3001_00.05.09@2", answer_label=3)],
    )
    return tmp_path


def test_reads_the_official_layout(data):
    examples = Vcr(data).examples("val")
    assert examples[0] == VcrExample(
        annot_id="val-1",
        question="What is person doing ?",
        answers=(
            "person is running .",
            "person is driving car .",
            "person and person are talking .",
            "person is asleep .",
        ),
        rationales=(
            "person sits behind the wheel of car .",
            "person is holding a cup .",
            "It is night .",
            "car is parked .",
        ),
        answer_label=1,
        rationale_label=0,
        image="3001_00.01.02@0",
    )
    assert (examples[1].image, examples[1].answer_label) == ("3001_00.05.09@2", 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rationale_label": 4}, "field 'rationale_label' is 4, not a choice in 0..3"),
        ({"answer_choices": [["Yes", "."]] * 3}, "field 'answer_choices' has 3 choices, VCR has 4"),
        ({"question": ["Is", [3], "red", "?"]}, r"question\[1\] refers to object 3, but .* 3"),
        ({"question": ["Is", {"id": 0}, "red", "?"]}, r"question\[1\] should be a word or a list"),
        ({"rationale_choices": [["a"], ["b"], ["c"], "d"]}, r"rationale_choices\[3\] should be"),
        ({"answer_label": "1"}, "field 'answer_label' should be int"),
        ({"img_fn": f"{MOVIE}/3001_09.09.09@9.jpg"}, "image 3001_09.09.09@9 is missing"),
    ],
    ids=[
        "label-4",
        "three-answers",
        "bad-reference",
        "bad-token",
        "bad-choice",
        "label-str",
        "no-image",
    ],
)
def test_bad_lines_are_errors_naming_file_and_line(data, change, message):
    good = line("val-1", "3001_00.01.02@0")
    bad = line("val-2", "3001_00.01.02@0", **change)
    write_lines(data / "val.jsonl", [good, bad, good])
    with pytest.raises(VLPruneError, match=rf"^{data / 'val.jsonl'}:2: .*{message}"):
        Vcr(data).examples("val")


def test_a_missing_field_or_broken_line_names_file_and_line(data):
    record = line("val-1", "3001_00.01.02@0")
    del record["answer_choices"]
    write_lines(data / "val.jsonl", [record])
    with pytest.raises(VLPruneError, match=r"val\.jsonl:1: field 'answer_choices' is missing"):
        Vcr(data).examples("val")
    write_lines(data / "val.jsonl", [line("val-1", "3001_00.01.02@0"), '{"question": ["Is"\n'])
    with pytest.raises(VLPruneError, match=r"val\.jsonl:2: not valid JSON"):
        Vcr(data).examples("val")


def test_q_ar_accuracy_needs_the_answer_and_the_rationale_right(tmp_path):
    task = Vcr(tmp_path)
    targets = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0]])
    # Both right; answer right but rationale wrong; answer wrong, rationale right; both wrong.
    predictions = torch.tensor([[0, 1], [2, 0], [0, 1], [1, 2]])
    assert accuracies(predictions, targets) == {"q_a": 0.5, "qa_r": 0.5, "q_ar": 0.25}
    assert task.score(predictions, targets) == 0.25
    logits = torch.zeros(2, 2, 4)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[1, 0, 1] = logits[1, 1, 0] = 1.0
    assert task.predict(logits).tolist() == [[2, 3], [1, 0]]


def test_loss_is_the_mean_cross_entropy_of_both_questions(tmp_path):
    task = Vcr(tmp_path)
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 3]])
    q_a = -torch.log_softmax(logits[0, 0], -1)[0]
    qa_r = -torch.log_softmax(logits[0, 1], -1)[3]
    torch.testing.assert_close(task.loss(logits, targets), (q_a + qa_r) / 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The world's VCR split at test size, written once for the tests below (about 2 s)."""
    root = tmp_path_factory.mktemp("vcr-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vcr_world, "WORLD_SIZES", WORLD)
        SPLIT.write(root, 0)
    return root


def test_world_split_round_trip(world):
    task = Vcr(world)
    for split, size in WORLD.items():
        examples = task.examples(split)
        assert len(examples) == size
        for label in ("answer_label", "rationale_label"):
            counts = Counter(getattr(e, label) for e in examples)
            assert set(counts) == {0, 1, 2, 3}
            assert max(counts.values()) < 0.4 * size
        records = [json.loads(text) for text in (world / f"{split}.jsonl").read_text().splitlines()]
        for record, example in zip(records, examples, strict=True):
            assert list(record) == OFFICIAL_FIELDS
            assert (world / "images" / f"{example.image}.png").is_file()
            assert (world / "features" / f"{example.image}.npz").is_file()
            metadata = json.loads((world / "vcr1images" / record["metadata_fn"]).read_text())
            assert metadata["names"] == record["objects"]
            assert len(metadata["boxes"]) == len(metadata["segms"]) == len(record["objects"])
            # A referenced object's class name says which object it is.
            (reference,) = [t for t in record["question"] if isinstance(t, list)]
            assert record["objects"].count(record["objects"][reference[0]]) == 1


def there_are(n: int) -> list[str]:
    """The words that say how many objects a "there are n … objects ." choice counts."""
    return ["there", "is" if n == 1 else "are", ["one", "two", "three", "four"][n - 1]]


def test_the_right_choices_are_true_of_the_scene_and_the_others_false():
    settings = WorldSettings()
    rng = scene_rng(settings, "test")
    kinds = Counter()
    for i in range(200):
        scene, question = commonsense_question(
            rng, settings, lambda attempt, i=i: new_scene(settings, "test", i, attempt)
        )
        (k,) = next(t for t in question.question if isinstance(t, list))
        thing = scene.things[k]
        colour = [[k], "is", thing.colour, "."]
        if question.question[0] == "how":
            answer, rationale = there_are(len(scene.things)), colour
        else:
            answer, rationale = colour, there_are(scene.count(colour=thing.colour))
        kinds[question.question[0]] += 1
        for choices, label, truth in (
            (question.answers, question.answer_label, answer),
            (question.rationales, question.rationale_label, rationale),
        ):
            assert [j for j, c in enumerate(choices) if c[: len(truth)] == truth] == [label]
    assert min(kinds.values()) > 70


def test_the_words_alone_do_not_give_the_choices_away(world):
    """A reader without the image, who picks the choice whose words were right most often in
    training, must be no better than chance on val."""
    task = Vcr(world)
    right: dict[str, list[int]] = {}
    for e in task.examples("train"):
        for choices, label in ((e.answers, e.answer_label), (e.rationales, e.rationale_label)):
            for j, choice in enumerate(choices):
                right.setdefault(choice, []).append(j == label)
    rate = {words: np.mean(hits) for words, hits in right.items()}
    guessed = []
    for e in task.examples("val"):
        for choices, label in ((e.answers, e.answer_label), (e.rationales, e.rationale_label)):
            scores = [rate.get(choice, 0.25) for choice in choices]
            guessed.append(int(np.argmax(scores)) == label)
    assert np.mean(guessed) < 0.35


def test_the_same_seed_writes_the_same_world(tmp_path, monkeypatch):
    monkeypatch.setattr(vcr_world, "WORLD_SIZES", {"train": 6, "val": 4})
    assert len(written_twice(SPLIT, tmp_path, seed=3)) == 2 + 3 * 10


@pytest.mark.parametrize("backbone", [Uniter, Lxmert, Vilt])
def test_collate_forward_and_loss(world, backbone):
    torch.manual_seed(0)
    model = backbone.build("tiny")
    task = Vcr(world)
    head = task.head(model)
    examples = task.examples("val")[:3]
    batch = task.collate(examples, model)

    q_a, qa_r = batch.inputs
    assert q_a.input_ids.shape[0] == qa_r.input_ids.shape[0] == 3 * 4
    decode = model.tokenizer.decode
    # Row 4i + j: example i's question with its choice j; after the right answer for QA→R.
    second = examples[1]
    assert decode(q_a.input_ids[6], skip_special_tokens=True) == (
        f"{second.question} {second.answers[2]}"
    )
    assert decode(qa_r.input_ids[5], skip_special_tokens=True) == (
        f"{second.question} {second.answers[second.answer_label]} {second.rationales[1]}"
    )
    assert batch.targets.tolist() == [[e.answer_label, e.rationale_label] for e in examples]
    if model.image_input == "regions":
        assert q_a.region_feats.shape[:2] == q_a.region_mask.shape
        assert torch.equal(q_a.region_feats[4], q_a.region_feats[7])
    else:
        assert q_a.pixel_values.shape[:2] == (12, 3)
    logits = VLModel(model, head)(batch)
    assert logits.shape == (3, 2, 4)
    loss = task.loss(logits, batch.targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())


def test_uniter_tiny_trains_through_vl_prune_train(world, one_thread):
    """A few steps of vl_prune.train.fit move the backbone and the head, and evaluate's batched,
    gathered score (predictions B × 2, concatenated across batches) is the Q→AR accuracy of the
    whole split."""
    torch.manual_seed(0)
    backbone = Uniter.build("tiny")
    task = Vcr(world)
    settings = TrainSettings(steps=3, batch_size=4, lr=3e-4, eval_batch_size=6)
    accelerator = make_accelerator(settings)
    model = accelerator.prepare(VLModel(backbone, task.head(backbone)))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = fit(model, task, task.examples("train")[:12], settings, accelerator, quiet=True)
    assert len(losses) == 3 and all(np.isfinite(losses))
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "head.classifier.3.weight" in moved
    assert "backbone.encoder.layer.0.attention.self.query.weight" in moved
    val = task.examples("val")[:16]
    score = evaluate(model, task, val, settings, accelerator)
    with torch.no_grad():
        batch = task.collate(val, backbone)
        assert score == pytest.approx(task.score(task.predict(model(batch)), batch.targets))


def test_list_tasks_shows_vcr_and_its_metric():
    result = CliRunner().invoke(cli, ["list", "tasks"])
    assert result.exit_code == 0, result.output
    (row,) = [text for text in result.output.splitlines() if text.split()[:1] == ["vcr"]]
    assert "q_ar_accuracy" in row
