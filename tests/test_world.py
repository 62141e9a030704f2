"""The embedded world: deterministic files, in-vocabulary language, exact truth values, and
region features / images in the layouts the readers expect."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vl_prune_plugins.tasks.nlvr2 as nlvr2
from vl_prune_plugins.world import language
from vl_prune_plugins.world.features import region_features
from vl_prune_plugins.world.images import new_scene, write_image
from vl_prune_plugins.world.language import NUMBER_WORDS, caption, question, statement
from vl_prune_plugins.world.scenes import Scene, Thing, WorldSettings, sample_scene
from vl_prune_plugins.world.vocabulary import SHAPES, plural, words

EVERY_NAME = WorldSettings(shapes=len(SHAPES), colours=8)
SINGULAR = {plural(shape): shape for shape in SHAPES}


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def small_world(monkeypatch):
    monkeypatch.setattr(nlvr2, "WORLD_SIZES", {"train": 12, "dev": 4})


def test_same_seed_writes_byte_identical_files(tmp_path, small_world):
    nlvr2.Nlvr2.write_world(tmp_path / "a", seed=3)
    nlvr2.Nlvr2.write_world(tmp_path / "b", seed=3)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len(a) == 2 + 2 * 2 * (12 + 4)  # two jsonl files; a PNG and an npz per image
    assert a == b


def test_another_seed_writes_another_world(tmp_path, small_world):
    nlvr2.Nlvr2.write_world(tmp_path / "a", seed=3)
    nlvr2.Nlvr2.write_world(tmp_path / "b", seed=4)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert a.keys() == b.keys()
    changed = [name for name in a if a[name] != b[name]]
    assert "train.json" in changed and "dev.json" in changed
    assert len(changed) > 0.9 * len(a)


def samples(settings: WorldSettings, count: int, seed: int = 0):
    """`count` (left, right, rng) draws, reproducibly."""
    rng = random.Random(seed)
    for _ in range(count):
        yield sample_scene(rng, settings), sample_scene(rng, settings), rng


@pytest.mark.parametrize("settings", [WorldSettings(), EVERY_NAME])
def test_every_sentence_uses_only_vocabulary_words(settings):
    vocabulary = set(words())
    sentences = []
    for left, right, rng in samples(settings, 1500):
        sentences.append(caption(left, rng))
        sentences.append(statement(left, right, rng.random() < 0.5, rng, settings))
        text, answer, kind = question(left, rng, settings)
        sentences += [text, answer, *language.human_answers(answer, kind, rng, settings)]
    unknown = {word for s in sentences for word in s.split() if word not in vocabulary}
    assert not unknown


def count_word(word: str) -> int:
    return NUMBER_WORDS.index(word)


def truth(text: str, left: Scene, right: Scene) -> bool:
    """The truth of a statement, recomputed from the scenes for each of the world's templates."""
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"there are exactly (\w+) (\w+) (\w+) in the (left|right) image \.", text):
        n, colour, shapes, where = m.groups()
        return side[where].count(SINGULAR[shapes], colour) == count_word(n)
    if m := re.fullmatch(r"both images contain a (\w+) \.", text):
        return left.count(m[1]) > 0 and right.count(m[1]) > 0
    if m := re.fullmatch(r"at least one image contains a (\w+) \.", text):
        return left.count(m[1]) + right.count(m[1]) > 0
    if m := re.fullmatch(r"the left image has more (\w+) than the right image \.", text):
        return left.count(SINGULAR[m[1]]) > right.count(SINGULAR[m[1]])
    if m := re.fullmatch(r"there are at least (\w+) (\w+) objects in the two images \.", text):
        return left.count(colour=m[2]) + right.count(colour=m[2]) >= count_word(m[1])
    if m := re.fullmatch(r"there are at least (\w+) objects in the two images \.", text):
        return left.count() + right.count() >= count_word(m[1])
    if m := re.fullmatch(r"there are (\w+) objects in the two images \.", text):
        return left.count() + right.count() == count_word(m[1])
    raise AssertionError(f"no template matches {text!r}")


@pytest.mark.parametrize("settings", [WorldSettings(), EVERY_NAME])
def test_statements_are_true_exactly_when_asked_to_be(settings):
    for i, (left, right, rng) in enumerate(samples(settings, 2000, seed=1)):
        label = i % 2 == 0
        text = statement(left, right, label, rng, settings)
        assert truth(text, left, right) == label, text


def row_of(count: int) -> Scene:
    return Scene(tuple(Thing("circle", "red", "small", (i + 0.5) / 8, 0.5) for i in range(count)))


def fallback_statement(left: Scene, right: Scene, label: bool, monkeypatch) -> str:
    """The sentence `statement` falls back to when no template gives the wanted truth value."""
    never = (lambda left, right, rng, settings: ("x", not label),)
    monkeypatch.setattr(language, "STATEMENTS", never)
    return statement(left, right, label, random.Random(0), WorldSettings())


@pytest.mark.parametrize(
    ("counts", "label"),
    [
        ((1, 1), True),
        ((3, 2), True),
        ((4, 4), True),
        ((1, 1), False),
        ((4, 4), False),
        ((6, 6), False),
    ],
)
def test_fallback_statement_has_the_asked_truth(counts, label, monkeypatch):
    left, right = row_of(counts[0]), row_of(counts[1])
    text = fallback_statement(left, right, label, monkeypatch)
    assert text.endswith(" objects in the two images .")
    assert truth(text, left, right) == label


@pytest.mark.parametrize("counts", [(5, 4), (6, 6)])
def test_true_fallback_statement_with_more_objects_than_number_words(counts, monkeypatch):
    left, right = row_of(counts[0]), row_of(counts[1])
    assert truth(fallback_statement(left, right, True, monkeypatch), left, right)


def test_region_features_layout():
    settings = WorldSettings(img_dim=32, distractors=2)
    for left, _, _ in samples(settings, 50, seed=3):
        regions = region_features(left, settings, np.random.default_rng(0))
        n = len(left.things) + settings.distractors
        features, norm_bb, conf = regions["features"], regions["norm_bb"], regions["conf"]
        assert features.shape == (n, 32) and features.dtype == np.float16
        assert norm_bb.shape == (n, 6) and norm_bb.dtype == np.float32
        assert conf.shape == (n,)
        np.testing.assert_allclose(norm_bb[:, 4], norm_bb[:, 2] - norm_bb[:, 0], atol=1e-6)
        np.testing.assert_allclose(norm_bb[:, 5], norm_bb[:, 3] - norm_bb[:, 1], atol=1e-6)
        assert (norm_bb[:, :4] >= 0).all() and (norm_bb[:, :4] <= 1).all()
        # Objects are the confident regions, at their boxes; distractors are the rest.
        objects = norm_bb[conf >= 0.6, :4]
        expected = np.asarray([thing.box() for thing in left.things], dtype=np.float32)
        np.testing.assert_allclose(np.unique(objects, axis=0), np.unique(expected, axis=0))


def test_written_image_files(tmp_path):
    settings = WorldSettings(image_size=96, img_dim=16)
    scene = new_scene(settings, "test", 0)
    assert scene == new_scene(settings, "test", 0)
    write_image(scene, "dev-0-0-img0", tmp_path, settings)
    with Image.open(tmp_path / "images" / "dev-0-0-img0.png") as image:
        assert image.format == "PNG" and image.size == (96, 96) and image.mode == "RGB"
    with np.load(tmp_path / "features" / "dev-0-0-img0.npz") as npz:
        assert sorted(npz.files) == ["conf", "features", "norm_bb"]
        assert npz["features"].shape == (len(scene.things) + settings.distractors, 16)
