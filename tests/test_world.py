"""The embedded world: deterministic files, in-vocabulary language, exact truth values, and
region features / images in the layouts the readers expect."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vl_prune_plugins.world.splits.nlvr2 as nlvr2_world
from vl_prune import registry
from vl_prune.errors import VLPruneError
from vl_prune.experiment import recipe
from vl_prune.world import WorldSplit, embedded_world
from vl_prune_plugins.world import language
from vl_prune_plugins.world.features import region_features
from vl_prune_plugins.world.images import new_scene, write_image
from vl_prune_plugins.world.language import NUMBER_WORDS, captions, question, statement
from vl_prune_plugins.world.scenes import Scene, WorldSettings, sample_scene
from vl_prune_plugins.world.splits.nlvr2 import SPLIT
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
    monkeypatch.setattr(nlvr2_world, "WORLD_SIZES", {"train": 12, "dev": 4})


def test_same_seed_writes_byte_identical_files(tmp_path, small_world):
    SPLIT.write(tmp_path / "a", 3)
    SPLIT.write(tmp_path / "b", 3)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len(a) == 2 + 2 * 2 * (12 + 4)  # two jsonl files; a PNG and an npz per image
    assert a == b


def test_another_seed_writes_another_world(tmp_path, small_world):
    SPLIT.write(tmp_path / "a", 3)
    SPLIT.write(tmp_path / "b", 4)
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
    for left, _, rng in samples(settings, 1500):
        sentences += captions(left)
        sentences.append(statement(rng, settings)[0])
        text, answer, kind = question(left, rng, settings)
        sentences += [text, answer, *language.human_answers(answer, kind, rng, settings)]
    unknown = {word for s in sentences for word in s.split() if word not in vocabulary}
    assert not unknown


def count_word(word: str) -> int:
    return NUMBER_WORDS.index(word)


def truth(text: str, left: Scene, right: Scene) -> bool:
    """The truth of a statement, recomputed from the scenes for each of the world's templates."""
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image contains a (\w+) object \.", text):
        return side[m[1]].count(colour=m[2]) > 0
    if m := re.fullmatch(r"the (left|right) image contains a (\w+) \.", text):
        return side[m[1]].count(m[2]) > 0
    if m := re.fullmatch(r"the (left|right) image has no (\w+) objects \.", text):
        return side[m[1]].count(colour=m[2]) == 0
    if m := re.fullmatch(r"both images contain a (\w+) \.", text):
        return left.count(m[1]) > 0 and right.count(m[1]) > 0
    if m := re.fullmatch(r"at least one image contains a (\w+) \.", text):
        return left.count(m[1]) + right.count(m[1]) > 0
    if text == "the left image has more objects than the right image .":
        return left.count() > right.count()
    if m := re.fullmatch(r"the left image has more (\w+) than the right image \.", text):
        return left.count(SINGULAR[m[1]]) > right.count(SINGULAR[m[1]])
    if m := re.fullmatch(r"there are at least (\w+) (\w+) objects in the two images \.", text):
        return left.count(colour=m[2]) + right.count(colour=m[2]) >= count_word(m[1])
    if m := re.fullmatch(r"the (left|right) image has at least (\w+) objects \.", text):
        return side[m[1]].count() >= count_word(m[2])
    if m := re.fullmatch(r"there are at least (\w+) objects in the two images \.", text):
        return left.count() + right.count() >= count_word(m[1])
    if m := re.fullmatch(r"there are (\w+) objects in the two images \.", text):
        return left.count() + right.count() == count_word(m[1])
    raise AssertionError(f"no template matches {text!r}")


@pytest.mark.parametrize("settings", [WorldSettings(), EVERY_NAME])
def test_statement_predicates_match_what_the_sentence_says(settings):
    truths = []
    for left, right, rng in samples(settings, 2000, seed=1):
        text, holds = statement(rng, settings)
        truths.append(holds(left, right))
        assert holds(left, right) == truth(text, left, right), text
    assert 0.2 < sum(truths) / len(truths) < 0.8, "templates must be neither always true nor false"


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


def test_the_world_names_an_unknown_task_and_a_task_without_a_split():
    world = embedded_world()
    with pytest.raises(VLPruneError, match=r"^unknown task 'nlvr3'; did you mean 'nlvr2'"):
        world.split("nlvr3")
    assert world.split("nlvr2") is SPLIT and world.recipe("nlvr2") == dict(SPLIT.recipe)


def test_a_backbone_gets_its_own_recipe_where_the_split_has_one(monkeypatch):
    # The world's NLVR2: lxmert-tiny needs twice uniter-tiny's steps to reach its plateau.
    assert recipe("nlvr2", world=True, backbone="lxmert").steps == 900
    assert recipe("nlvr2", world=True, backbone="uniter").steps == SPLIT.recipe["steps"] == 450
    world = embedded_world()
    own = WorldSplit(
        write=SPLIT.write,
        recipe={"steps": 5, "lr": 1e-3},
        version=1,
        backbone_recipes={"lxmert": {"steps": 9}},
    )
    listed = registry.Plugin("world_splits", "nlvr2", "x:OWN", "own-dist")
    monkeypatch.setattr(registry, "plugins", lambda kind: [listed])
    monkeypatch.setattr(registry, "find", lambda kind, name: listed)
    monkeypatch.setattr(registry.Plugin, "load", lambda self: own)
    assert world.recipe("nlvr2", "lxmert") == {"steps": 9, "lr": 1e-3}
    assert world.recipe("nlvr2", "uniter") == world.recipe("nlvr2") == {"steps": 5, "lr": 1e-3}
    bad = replace(own, backbone_recipes={"lxmert": {"step": 9}})
    monkeypatch.setattr(registry.Plugin, "load", lambda self: bad)
    with pytest.raises(VLPruneError, match=r"has lxmert's recipe keys 'step', which are not"):
        world.recipe("nlvr2", "lxmert")


def test_a_world_split_whose_recipe_is_no_training_setting_is_refused(monkeypatch):
    bad = WorldSplit(write=SPLIT.write, recipe={"steps": 5, "learning_rate": 1e-3}, version=1)
    listed = registry.Plugin("world_splits", "nlvr2", "x:BAD", "bad-dist")
    monkeypatch.setattr(registry, "plugins", lambda kind: [listed])
    monkeypatch.setattr(registry, "find", lambda kind, name: listed)
    monkeypatch.setattr(registry.Plugin, "load", lambda self: bad)
    with pytest.raises(VLPruneError, match=r"^world split 'nlvr2' \(from bad-dist\) has recipe "):
        embedded_world().recipe("nlvr2")


@pytest.mark.parametrize(
    ("changes", "fault"),
    [
        ({"recipe": [("steps", 5)]}, "has recipe of type list, not a mapping of TrainSettings"),
        ({"backbone_recipes": {"lxmert": 900}}, "has lxmert's recipe of type int, not a mapping"),
        ({"backbone_recipes": [("lxmert", {})]}, "has backbone_recipes of type list, not a map"),
    ],
)
def test_a_world_split_whose_recipes_are_no_mappings_is_named(monkeypatch, changes, fault):
    bad = replace(WorldSplit(write=SPLIT.write, recipe={"steps": 5}, version=1), **changes)
    listed = registry.Plugin("world_splits", "nlvr2", "x:BAD", "bad-dist")
    monkeypatch.setattr(registry, "plugins", lambda kind: [listed])
    monkeypatch.setattr(registry, "find", lambda kind, name: listed)
    monkeypatch.setattr(registry.Plugin, "load", lambda self: bad)
    with pytest.raises(VLPruneError, match=r"^world split 'nlvr2' \(from bad-dist\) ") as caught:
        embedded_world().recipe("nlvr2", "lxmert")
    assert fault in str(caught.value)
