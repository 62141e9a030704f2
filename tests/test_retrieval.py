"""Image-text retrieval: the Karpathy-split reader, its errors, negatives, the R@K metric over a
whole pool, the world's split, and batches and training for the tiny backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from task_checks import written_twice

import vl_prune_plugins.world.splits.retrieval as retrieval_world
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune.train import TrainSettings, evaluate, fit, make_accelerator
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.retrieval import Candidate, Caption, Pool, Retrieval, recalls
from vl_prune_plugins.world.splits.retrieval import SPLIT
from vl_prune_plugins.world.vocabulary import words

WORLD = {"train": 40, "val": 8}
# 3 images × 6 captions, two per image; by hand, counting wrong candidates scoring at least as
# high as the right one: IR ranks 0 2 1 0 0 1 (captions), TR ranks 0 1 2 (images).
SCORES = torch.tensor(
    [
        [0.90, 0.1, 0.8, 0.3, 0.2, 0.00],
        [0.75, 0.2, 0.7, 0.6, 0.1, 0.40],
        [0.55, 0.3, 0.6, 0.1, 0.5, 0.35],
    ]
)
IMAGE_OF = torch.tensor([0, 0, 1, 1, 2, 2])


def image(filename: str, split: str, captions: list[str], imgid: int, sentid: int) -> dict:
    """An entry of Karpathy's dataset_flickr30k.json, in its key order."""
    sentids = list(range(sentid, sentid + len(captions)))
    return {
        "sentids": sentids,
        "imgid": imgid,
        "sentences": [
            {"tokens": raw.rstrip(" .").split(), "raw": raw, "imgid": imgid, "sentid": s}
            for raw, s in zip(captions, sentids, strict=True)
        ],
        "split": split,
        "filename": filename,
    }


def release() -> dict:
    """Six Flickr30k images over the four Karpathy splits; captions in the world's words."""
    captions = {
        ("1000092795.jpg", "train"): ["a red circle .", "a circle ."],
        ("10002456.jpg", "train"): ["a blue star .", "a circle ."],
        ("1000268201.jpg", "restval"): ["a green square ."],
        ("1000344755.jpg", "val"): ["a yellow heart .", "two hearts ."],
        ("1000366164.jpg", "val"): ["a red star .", "one star ."],
        ("1000523639.jpg", "test"): ["a blue circle ."],
    }
    images, sentid = [], 0
    for imgid, ((filename, split), texts) in enumerate(captions.items()):
        images.append(image(filename, split, texts, imgid, sentid))
        sentid += len(texts)
    return {"images": images, "dataset": "flickr30k"}


def write_release(root: Path, content: dict) -> Path:
    """dataset_flickr30k.json, and region features whose values are each image's imgid + 1."""
    (root / "features").mkdir(exist_ok=True)
    for entry in content["images"]:
        np.savez(
            root / "features" / f"{Path(entry['filename']).stem}.npz",
            features=np.full((3, 64), entry["imgid"] + 1, np.float16),
            norm_bb=np.full((3, 6), 0.5, np.float32),
            conf=np.ones(3, np.float32),
        )
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retrieval-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval_world, "WORLD_SIZES", WORLD)
        SPLIT.write(root, 0)
    return root


def test_reads_the_karpathy_layout(tmp_path):
    write_release(tmp_path, release())
    task = Retrieval(tmp_path)
    train = task.examples("train")
    # "restval" images train with "train", as in Karpathy's and UNITER's COCO set-ups.
    assert train == [
        Caption("a red circle .", "1000092795", "train", 0),
        Caption("a circle .", "1000092795", "train", 1),
        Caption("a blue star .", "10002456", "train", 2),
        Caption("a circle .", "10002456", "train", 3),
        Caption("a green square .", "1000268201", "train", 4),
    ]
    pool = task.examples("val")
    assert isinstance(pool, Pool) and len(pool) == 2 * 4
    assert list(pool)[:5] == [Candidate("val", 0, c) for c in range(4)] + [Candidate("val", 1, 0)]
    assert pool[-1] == Candidate("val", 1, 3) and pool[2:4] == [pool[2], pool[3]]
    assert task.read("val").images == ("1000344755", "1000366164")
    assert len(task.examples("test")) == 1


def test_pool_batches_are_pairs_with_their_positions(tmp_path):
    write_release(tmp_path, release())
    task = Retrieval(tmp_path)
    batch = task.collate(task.examples("val")[2:6], Uniter.build("tiny"))
    assert batch.targets.tolist() == [[0, 2, 1], [0, 3, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.inputs[0].region_feats[:, 0, 0].tolist() == [4, 4, 5, 5]
    batch = task.collate([Candidate("val", 1, 3)], Uniter.build("tiny"))
    assert batch.targets.tolist() == [[1, 3, 1]]


def test_training_batches_pair_each_caption_with_real_negatives(tmp_path):
    """Each caption comes with its image, a negative image and a negative caption; "a circle ."
    was written for two images, so neither is a negative of the other's copy. Seeded."""
    write_release(tmp_path, release())
    task = Retrieval(tmp_path)
    backbone = Uniter.build("tiny")
    train = task.examples("train")
    value = {"1000092795": 1, "10002456": 2, "1000268201": 3}  # region features: imgid + 1
    captions_of = {
        1: {"a red circle .", "a circle ."},
        2: {"a blue star .", "a circle ."},
        3: {"a green square ."},
    }
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        batch = task.collate(train, backbone)
        assert batch.targets.tolist() == [[1, 0, 0]] * len(train)
        inputs = batch.inputs[0]
        texts = backbone.tokenizer.batch_decode(inputs.input_ids, skip_special_tokens=True)
        shown = inputs.region_feats[:, 0, 0].long().tolist()
        for i, caption in enumerate(train):
            own, negative_image, negative_caption = range(3 * i, 3 * i + 3)
            assert texts[own] == texts[negative_image] == caption.text
            assert shown[own] == shown[negative_caption] == value[caption.image]
            if caption.text == "a circle .":
                assert shown[negative_image] not in (1, 2)
            else:
                assert shown[negative_image] != shown[own]
            assert texts[negative_caption] not in captions_of[shown[own]]
            seen.add((caption.index, shown[negative_image]))
    assert len(seen) == 2 + 1 + 2 + 1 + 2, "every allowed negative gets drawn"
    torch.manual_seed(3)
    first = task.collate(train, backbone).inputs[0]
    torch.manual_seed(3)
    again = task.collate(train, backbone).inputs[0]
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.region_feats, again.region_feats)


def test_recall_at_k_by_hand():
    assert recalls(SCORES, IMAGE_OF, ks=(1, 2, 5)) == pytest.approx(
        {
            "ir_r1": 3 / 6,
            "ir_r2": 5 / 6,
            "ir_r5": 1.0,
            "tr_r1": 1 / 3,
            "tr_r2": 2 / 3,
            "tr_r5": 1.0,
            "recall_mean": (3 / 6 + 5 / 6 + 1 + 1 / 3 + 2 / 3 + 1) / 6,
        }
    )
    assert recalls(SCORES, IMAGE_OF)["recall_mean"] == pytest.approx((3 / 6 + 1 / 3 + 4) / 6)


@pytest.mark.parametrize("fill", [0.3, float("nan")])
def test_scoring_every_pair_alike_recalls_nothing(fill):
    flat = recalls(torch.full((3, 6), fill), IMAGE_OF, ks=(1, 2))
    assert flat["ir_r1"] == flat["ir_r2"] == flat["tr_r1"] == flat["tr_r2"] == 0


def pool_targets() -> torch.Tensor:
    """(image, caption, caption's image) of every pair of the 3 × 6 pool, image-major."""
    return torch.tensor([[i, c, IMAGE_OF[c]] for i in range(3) for c in range(6)])


def test_score_rebuilds_the_matrix_from_pairs_in_any_order(tmp_path):
    task = Retrieval(tmp_path)
    targets = pool_targets()
    predictions = SCORES.flatten()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    assert task.score(predictions[order], targets[order]) == pytest.approx(
        recalls(SCORES, IMAGE_OF)["recall_mean"]
    )
    with pytest.raises(VLPruneError, match="cover 17 of the pool's 18 image-caption pairs"):
        task.score(predictions[1:], targets[1:])
    with pytest.raises(VLPruneError, match="cover 12 of the pool's 18"):
        task.score(predictions[:12], targets[:12])
    with pytest.raises(VLPruneError, match="1 of them more than once"):
        task.score(torch.cat([predictions, predictions[:1]]), torch.cat([targets, targets[:1]]))
    with pytest.raises(VLPruneError, match="pairs of an evaluation pool"):
        task.score(torch.zeros(6), torch.tensor([[1, 0, 0], [1, 0, 0]]))


def test_loss_is_uniter_triplet_loss_on_sigmoid_scores(tmp_path):
    task = Retrieval(tmp_path)
    # Sigmoids 0.5 0.5 0.5 | 0.75 0.5 0.7; margin 0.2: hinges 0.2 0.2 | 0 0.15.
    scores = torch.tensor([0.0, 0.0, 0.0, np.log(3), 0.0, np.log(7 / 3)], dtype=torch.float32)
    targets = torch.tensor([[1, 0, 0], [1, 0, 0]])
    assert task.loss(scores, targets).item() == pytest.approx((0.2 + 0.2 + 0 + 0.15) / 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["images"][1]["sentences"][0].pop("raw"),
            "sentences[0]: field 'raw' is missing",
        ),
        (lambda c: c["images"][1].pop("split"), "field 'split' is missing"),
        (lambda c: c["images"][1].update(sentences="a circle"), "'sentences' should be list"),
        (lambda c: c["images"][1]["sentences"][1].update(raw=" "), "sentences[1]: the caption is"),
        (lambda c: c["images"][1].update(filename="1000092795.jpg"), "1000092795 is listed twice"),
        (lambda c: c["images"][1].update(filename="404.jpg"), "no features/404.npz"),
    ],
    ids=["no-raw", "no-split", "sentences-text", "empty-caption", "twice", "missing-image"],
)
def test_bad_records_are_errors_naming_file_and_record(tmp_path, change, message):
    content = release()
    path = write_release(tmp_path, content)
    change(content)
    path.write_text(json.dumps(content))
    with pytest.raises(VLPruneError) as error:
        Retrieval(tmp_path).examples("train")
    assert str(error.value).startswith(f"{path}: images[1]")
    assert message in str(error.value)


def test_malformed_or_missing_files_are_errors(tmp_path):
    with pytest.raises(VLPruneError, match=r"dataset_<name>\.json, found none"):
        Retrieval(tmp_path).examples("train")
    path = write_release(tmp_path, release())
    path.write_text(path.read_text()[:-30])
    with pytest.raises(VLPruneError, match=rf"^{path}:1: not valid JSON"):
        Retrieval(tmp_path).examples("train")
    write_release(tmp_path, release())
    with pytest.raises(VLPruneError, match=rf"^{path}: no captions in split 'dev'"):
        Retrieval(tmp_path).examples("dev")


def test_world_split_round_trip(world):
    content = json.loads((world / "dataset_world.json").read_text())
    assert list(content) == ["images", "dataset"]
    for entry in content["images"]:
        assert list(entry) == ["sentids", "imgid", "sentences", "split", "filename"]
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        assert all(list(s) == ["tokens", "raw", "imgid", "sentid"] for s in entry["sentences"])
    task = Retrieval(world)
    vocabulary = set(words())
    for name, size in WORLD.items():
        split = task.read(name)
        assert len(split.images) == size and len(split.captions) == 5 * size
        for stem in split.images:
            assert (world / "images" / f"{stem}.png").is_file()
            assert (world / "features" / f"{stem}.npz").is_file()
        # Each caption names all of its scene's objects, and no two scenes of a split hold the
        # same objects: a caption is written for (and true of) one image only.
        assert all(len(images) == 1 for images in split.holders.values())
        assert all(set(c.text.split()) <= vocabulary for c in split.captions)
    assert len(task.examples("train")) == 5 * WORLD["train"]
    assert len(task.examples("val")) == WORLD["val"] * 5 * WORLD["val"]


def test_world_scenes_can_differ_in_one_word(world):
    """Retrieval is not trivial: some images of a split are told apart only by object sizes."""
    split = Retrieval(world).read("train")
    first = {}
    for caption in split.captions[::5]:
        first[caption.image] = " ".join(sorted(caption.text.replace("large", "small").split()))
    assert len(set(first.values())) < len(first)


def test_the_same_seed_writes_the_same_world(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval_world, "WORLD_SIZES", {"train": 4, "val": 2})
    assert len(written_twice(SPLIT, tmp_path, seed=3)) == 1 + 2 * 6


@pytest.mark.parametrize("backbone", [Lxmert, Vilt])
def test_collate_forward_and_loss(world, backbone, one_thread):
    torch.manual_seed(0)
    model = backbone.build("tiny")
    task = Retrieval(world)
    head = task.head(model)
    batch = task.collate(task.examples("train")[:2], model)
    scores = VLModel(model, head)(batch)
    assert scores.shape == (6,)
    loss = task.loss(scores, batch.targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())


def test_uniter_trains_and_scores_the_whole_pool_through_accelerate(world, one_thread):
    """A few fit steps, then evaluate in uneven batches: its score is the recall of the full
    matrix of the model's scores."""
    torch.manual_seed(0)
    backbone = Uniter.build("tiny")
    task = Retrieval(world)
    model = VLModel(backbone, task.head(backbone))
    settings = TrainSettings(steps=3, batch_size=8, eval_batch_size=67)
    accelerator = make_accelerator(settings)
    prepared = accelerator.prepare(model)
    losses = fit(prepared, task, task.examples("train"), settings, accelerator, quiet=True)
    assert len(losses) == 3 and all(np.isfinite(losses))
    pool = task.examples("val")
    score = evaluate(prepared, task, pool, settings, accelerator)
    model.eval()
    with torch.no_grad():
        scores = model(task.collate(list(pool), backbone)).view(WORLD["val"], -1)
    split = task.read("val")
    assert score == pytest.approx(recalls(scores, torch.tensor(split.image_of))["recall_mean"])
    assert 0 <= score <= 1


def test_adversarial_consistency_compares_match_probabilities(tmp_path):
    task = Retrieval(tmp_path)
    clean = torch.tensor([0.0, 2.0])
    assert task.consistency(clean, clean).item() == pytest.approx(0.0, abs=1e-7)
    p, q = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))
    expected = ((p - q) * (torch.logit(p) - torch.logit(q))).item() / 2
    moved = task.consistency(clean, torch.tensor([0.0, -1.0])).item()
    assert moved == pytest.approx(expected, rel=1e-5)


def test_too_few_images_for_a_negative_is_an_error(tmp_path):
    content = release()
    content["images"] = [content["images"][0]]
    write_release(tmp_path, content)
    task = Retrieval(tmp_path)
    with pytest.raises(VLPruneError, match=r"found no image that caption 'a red circle \.'"):
        task.collate(task.examples("train")[:1], Uniter.build("tiny"))
