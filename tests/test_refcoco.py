"""RefCOCO+: the refer toolkit's layout (pickled or JSON refs), the restricted unpickler, IoU and
accuracy, the world's referring expressions and split, batches, training and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from task_checks import train_briefly, written_twice

import vl_prune_plugins.tasks.refcoco as refcoco
import vl_prune_plugins.world.splits.refcoco as refcoco_world
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune.world import embedded_world
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.refcoco import RefcocoPlus, accuracy, iou
from vl_prune_plugins.world.images import scene_rng
from vl_prune_plugins.world.referring import expression
from vl_prune_plugins.world.scenes import SIZES, WorldSettings, sample_scene
from vl_prune_plugins.world.splits.refcoco import SPLIT
from vl_prune_plugins.world.vocabulary import COLOURS, PLACES, SHAPES, words

# Every test here trains tiny models (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

MAN, DOG = "COCO_train2014_000000581857", "COCO_train2014_000000393225"
WORLD = {"train": 30, "val": 10}


def sentence(sent_id: int, text: str) -> dict:
    return {"tokens": text.split(), "raw": text.capitalize(), "sent_id": sent_id, "sent": text}


def annotation(ann_id: int, image_id: int, bbox: list[float]) -> dict:
    return {"iscrowd": 0, "image_id": image_id, "bbox": bbox, "category_id": 1, "id": ann_id}


def release() -> tuple[dict, list]:
    """instances.json and the refs of two images (640 × 480 and 500 × 375), as refer ships
    them; the refs cover all four UNC splits."""
    instances = {
        "images": [
            {"license": 1, "file_name": f"{MAN}.jpg", "height": 480, "width": 640, "id": 581857},
            {"license": 1, "file_name": f"{DOG}.jpg", "height": 375, "width": 500, "id": 393225},
        ],
        "annotations": [
            annotation(1001, 581857, [64, 48, 128, 96]),
            annotation(1002, 581857, [320, 240, 160, 120]),
            annotation(2001, 393225, [50, 75, 100, 75]),
        ],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }

    def ref(ref_id, ann_id, image_id, split, *sentences):
        return {
            "sent_ids": [s["sent_id"] for s in sentences],
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "ann_id": ann_id,
            "ref_id": ref_id,
            "image_id": image_id,
            "split": split,
            "sentences": list(sentences),
            "category_id": 1,
        }

    refs = [
        ref(0, 1001, 581857, "train", sentence(10, "man in red"), sentence(11, "guy red shirt")),
        ref(1, 2001, 393225, "train", sentence(12, "white dog")),
        ref(2, 1002, 581857, "val", sentence(13, "woman in blue")),
        ref(3, 1002, 581857, "testA", sentence(14, "lady blue")),
        ref(4, 2001, 393225, "testB", sentence(15, "dog")),
    ]
    return instances, refs


def regions(path: Path, boxes: list[tuple[float, float, float, float]]) -> None:
    """A detector's regions in UNITER's npz layout, with these normalised x1, y1, x2, y2 boxes."""
    xyxy = np.asarray(boxes, np.float32)
    norm_bb = np.concatenate([xyxy, xyxy[:, 2:] - xyxy[:, :2]], 1)
    features = np.random.default_rng(len(boxes)).standard_normal((len(boxes), 64))
    np.savez(path, features=features.astype(np.float16), norm_bb=norm_bb, conf=np.ones(len(boxes)))


def write_release(root: Path, instances: dict, refs, form: str = "pickle") -> Path:
    """The refer layout under `root`; the path of the refs file."""
    folder = root / "refcoco+"
    folder.mkdir(exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    if form == "pickle":
        path = folder / "refs(unc).p"
        path.write_bytes(refs if isinstance(refs, bytes) else pickle.dumps(refs, protocol=2))
    else:
        path = folder / "refs(unc).json"
        path.write_text(json.dumps(refs))
    (root / "features").mkdir(exist_ok=True)
    # The man's box exactly, a near miss, and the woman's; for the dog a detection of IoU 0.6.
    regions(root / "features" / f"{MAN}.npz", [(0.12, 0.1, 0.32, 0.3), (0.1, 0.1, 0.3, 0.3)])
    regions(root / "features" / f"{DOG}.npz", [(0.15, 0.2, 0.35, 0.4), (0.6, 0.6, 0.9, 0.9)])
    return path


MAN_BOX = (0.1, 0.1, 0.3, 0.3)  # [64, 48, 128, 96] on 640 × 480
DOG_BOX = (0.1, 0.2, 0.3, 0.4)  # [50, 75, 100, 75] on 500 × 375


@pytest.mark.parametrize("form", ["pickle", "json"])
def test_reads_the_refer_layout(tmp_path, form):
    write_release(tmp_path, *release(), form=form)
    task = RefcocoPlus(tmp_path)
    train = task.examples("train")
    assert [(e.sent_id, e.ref_id, e.sentence, e.image) for e in train] == [
        (10, 0, "man in red", MAN),
        (11, 0, "guy red shirt", MAN),
        (12, 1, "white dog", DOG),
    ]
    for example, box in zip(train, (MAN_BOX, MAN_BOX, DOG_BOX), strict=True):
        assert example.box == pytest.approx(box)
    assert [e.sentence for e in task.examples("val")] == ["woman in blue"]
    assert [e.sentence for e in task.examples("testA")] == ["lady blue"]
    assert [e.sentence for e in task.examples("testB")] == ["dog"]


def py2_pickle(value) -> bytes:
    """`value` pickled as Python 2's cPickle.dump(value, f, 2) writes it: str as bytes."""

    def opcodes(v) -> bytes:
        if isinstance(v, dict):
            items = b"".join(opcodes(k) + opcodes(x) for k, x in v.items())
            return b"}(" + items + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(opcodes(x) for x in v) + b"e"
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        data = v.encode("utf-8")
        return b"U" + bytes([len(data)]) + data

    return b"\x80\x02" + opcodes(value) + b"."


def test_reads_a_python2_pickle_whose_strings_are_bytes(tmp_path):
    instances, refs = release()
    refs[1]["sentences"][0]["sent"] = "white dog on the café chair"
    write_release(tmp_path, instances, py2_pickle(refs))
    examples = RefcocoPlus(tmp_path).examples("train")
    assert examples[2].sentence == "white dog on the café chair"
    assert examples[2].ref_id == 1


class Exploit:
    """What a malicious pickle holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_naming_the_file(tmp_path):
    instances, refs = release()
    marker = tmp_path / "pwned"
    path = write_release(tmp_path, instances, pickle.dumps([*refs, Exploit(marker)]))
    with pytest.raises(VLPruneError, match=r"refused to load (posix|nt|os)\.system") as error:
        RefcocoPlus(tmp_path).examples("train")
    assert str(error.value).startswith(f"{path}: ")
    assert not marker.exists()


def test_a_corrupt_pickle_is_an_error_naming_the_file(tmp_path):
    instances, refs = release()
    path = write_release(tmp_path, instances, pickle.dumps(refs)[:-30])
    with pytest.raises(VLPruneError, match="not a readable pickle") as error:
        RefcocoPlus(tmp_path).examples("train")
    assert str(error.value).startswith(f"{path}: ")


REFS, INSTANCES = "refcoco+/refs(unc).json", "refcoco+/instances.json"


@pytest.mark.parametrize(
    ("change", "named", "message"),
    [
        (
            lambda i, r: r[1]["sentences"][0].pop("sent"),
            REFS,
            r"refs\[1\] \(ref_id 1\): sentences\[0\]: field 'sent' is missing",
        ),
        (
            lambda i, r: r[0].update(ann_id=999),
            REFS,
            r"refs\[0\] \(ref_id 0\): ann_id 999 is not in .*instances\.json",
        ),
        (
            lambda i, r: r[1].update(image_id=581857),
            REFS,
            r"refs\[1\] \(ref_id 1\): image_id 581857, but .*annotations\[2\] \(id 2001\) is on",
        ),
        (
            lambda i, r: i["annotations"][0].update(bbox=[64, 48, 0, 96]),
            INSTANCES,
            r"annotations\[0\] \(id 1001\): bbox \[64, 48, 0, 96\] is not \[x, y, width, height\]",
        ),
        (
            lambda i, r: i["images"][1].pop("width"),
            INSTANCES,
            r"images\[1\] \(id 393225\): field 'width' is missing",
        ),
    ],
    ids=["no-sent", "unknown-ann", "wrong-image", "empty-bbox", "no-width"],
)
def test_bad_records_are_errors_naming_file_and_record(tmp_path, change, named, message):
    instances, refs = release()
    change(instances, refs)
    write_release(tmp_path, instances, refs, form="json")
    with pytest.raises(VLPruneError, match=message) as error:
        RefcocoPlus(tmp_path).examples("train")
    assert str(error.value).startswith(f"{tmp_path / named}: ")


def test_a_missing_image_is_an_error_naming_it(tmp_path):
    write_release(tmp_path, *release(), form="json")
    (tmp_path / "features" / f"{DOG}.npz").unlink()
    with pytest.raises(VLPruneError, match=rf"refs\[1\] \(ref_id 1\): image {DOG} is missing"):
        RefcocoPlus(tmp_path).examples("train")


def test_iou_against_hand_computed_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 4)
    b = torch.tensor(
        [[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0], [2, 2, 3, 3]]
    )
    torch.testing.assert_close(iou(a, b), torch.tensor([1 / 7, 1.0, 4 / 16, 0.0]))
    # Normalised boxes give the IoU of the boxes in pixels: x and y may scale differently.
    pixels = iou(torch.tensor([64.0, 48, 192, 144]), torch.tensor([96.0, 48, 224, 144]))
    normalised = iou(torch.tensor([0.1, 0.1, 0.3, 0.3]), torch.tensor([0.15, 0.1, 0.35, 0.3]))
    torch.testing.assert_close(pixels, normalised)
    torch.testing.assert_close(normalised, torch.tensor(0.6))


def test_accuracy_counts_boxes_with_iou_of_at_least_a_half():
    referred = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    predicted = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # the same box
            [0.0, 0.0, 2.0, 1.0],  # IoU 1/2 exactly
            [0.0, 0.0, 2.1, 1.0],  # IoU 1/2.1
            [0.5, 0.5, 1.5, 1.5],  # IoU 1/7
        ]
    )
    assert accuracy(predicted, referred) == pytest.approx(2 / 4)


def test_targets_are_the_best_region_and_a_prediction_is_right_by_iou(tmp_path):
    write_release(tmp_path, *release())
    task = RefcocoPlus(tmp_path)
    batch = task.collate(task.examples("train"), Uniter.build("tiny"))
    assert batch.targets["region"].tolist() == [1, 1, 0]
    torch.testing.assert_close(batch.targets["box"], torch.tensor([MAN_BOX, MAN_BOX, DOG_BOX]))
    boxes = batch.inputs[0].region_boxes[..., :4]
    # The man's near miss (IoU 0.82) and the dog's detection (IoU 0.6) both count as right.
    outputs = {"scores": torch.tensor([[2.0, 1.0], [1.0, 2.0], [2.0, 1.0]]), "boxes": boxes}
    assert task.score(task.predict(outputs), batch.targets) == 1.0
    outputs["scores"] = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 2.0]])
    assert task.score(task.predict(outputs), batch.targets) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refcoco-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(refcoco_world, "WORLD_SIZES", WORLD)
        SPLIT.write(root, 0)
    return root


def test_world_split_round_trip(world):
    task = RefcocoPlus(world)
    backbone = Uniter.build("tiny")
    per_image = refcoco_world.REFS_PER_IMAGE * refcoco_world.SENTENCES_PER_REF
    for split, images in WORLD.items():
        examples = task.examples(split)
        assert len(examples) == images * per_image
        assert len({e.image for e in examples}) == images
        batch = task.collate(examples, backbone)
        overlap = iou(batch.inputs[0].region_boxes[..., :4], batch.targets["box"][:, None])
        # The regions are the objects: one matches the referred box, no other comes close.
        best = overlap.sort(dim=1, descending=True).values
        assert (best[:, 0] > 0.999).all() and (best[:, 1] < refcoco.IOU_THRESHOLD).all()
        assert torch.equal(overlap.argmax(1), batch.targets["region"])
    refs = json.loads((world / REFS).read_text())
    assert list(refs[0]) == [
        "sent_ids",
        "file_name",
        "ann_id",
        "ref_id",
        "image_id",
        "split",
        "sentences",
        "category_id",
    ]
    assert list(refs[0]["sentences"][0]) == ["tokens", "raw", "sent_id", "sent"]
    instances = json.loads((world / INSTANCES).read_text())
    assert set(instances) == {"images", "annotations", "categories"}


def test_the_same_seed_writes_the_same_world(tmp_path, monkeypatch):
    monkeypatch.setattr(refcoco_world, "WORLD_SIZES", {"train": 3, "val": 2})
    assert len(written_twice(SPLIT, tmp_path, seed=5)) == 2 + 2 * 5


def test_world_expressions_single_out_their_object_by_appearance():
    """Every expression names only the target among the scene's objects, uses no location word
    (RefCOCO+'s rule) and only the tokenizer's words. Many (0.4 here) name an attribute a
    distractor shares, where no single word gives the answer away."""
    settings = WorldSettings(seed=0, **refcoco_world.WORLD_SCENES)
    rng = scene_rng(settings, "test")
    attribute_words = set(SIZES) | set(COLOURS) | set(SHAPES)

    def kind(thing) -> set[str]:
        return {thing.size, thing.colour, thing.shape}

    shared = said = 0
    for _ in range(200):
        scene = sample_scene(rng, settings)
        for target in scene.things:
            text = expression(scene, target, rng)
            others = [t for t in scene.things if t is not target]
            if text is None:  # only an object with a twin has no expression
                assert any(kind(t) == kind(target) for t in others)
                continue
            named = set(text.split())
            assert named <= set(words()) and not named & set(PLACES), text
            named &= attribute_words
            assert named <= kind(target) and not any(named <= kind(t) for t in others), text
            said += 1
            shared += any(named & kind(t) for t in others)
    assert shared / said > 0.3


@pytest.mark.parametrize("backbone", [Uniter, Lxmert])
def test_collate_forward_and_loss(world, backbone):
    torch.manual_seed(0)
    model = backbone.build("tiny")
    task = RefcocoPlus(world)
    head = task.head(model)
    batch = task.collate(task.examples("val")[:6], model)
    outputs = VLModel(model, head)(batch)
    mask = batch.inputs[0].region_mask
    assert outputs["scores"].shape == mask.shape
    assert (outputs["scores"][mask == 0] == refcoco.MASKED).all()
    loss = task.loss(outputs, batch.targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())
    assert task.predict(outputs).shape == (6, 4)
    assert task.consistency(outputs, outputs).item() == pytest.approx(0.0, abs=1e-6)


def test_pixel_backbones_are_refused(world):
    with pytest.raises(VLPruneError, match="RefcocoPlus needs regions input; Vilt reads pixels"):
        RefcocoPlus(world).head(Vilt.build("tiny"))


def test_a_few_training_steps_through_fit(world):
    task = RefcocoPlus(world)
    assert 0.0 <= train_briefly(task, task.examples("val"), steps=4) <= 1.0


def test_the_cli_lists_the_task_and_refuses_vilt_in_one_line(tmp_path, monkeypatch):
    listed = CliRunner().invoke(cli, ["list", "tasks"])
    line = next(x for x in listed.output.splitlines() if "refcoco+" in x)
    assert "accuracy" in line
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(refcoco_world, "WORLD_SIZES", {"train": 2, "val": 1})
    # A fresh tiny ViLT stands in for its world θ0, which would take minutes to build.
    monkeypatch.setattr(embedded_world(), "theta0", lambda backbone_class, name: Vilt.build("tiny"))
    runs = str(tmp_path / "runs")
    result = CliRunner().invoke(
        cli, ["find", "--model", "vilt", "--task", "refcoco+", "--quiet", "--runs", runs]
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "vlprune: error: RefcocoPlus needs regions input; Vilt reads pixels"
    ]
