"""Writing one world image to disk: the PNG and its region features (UNITER's npz layout)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from vl_prune_plugins.world.features import region_features
from vl_prune_plugins.world.render import render
from vl_prune_plugins.world.scenes import Scene, WorldSettings, sample_scene


def scene_rng(settings: WorldSettings, *key: object) -> random.Random:
    """A generator for one named thing of the world, independent of everything else drawn."""
    return random.Random(repr((settings.seed, *key)))


def write_image(scene: Scene, name: str, root: Path, settings: WorldSettings) -> None:
    """`root/images/<name>.png` and `root/features/<name>.npz`.

    Plain writes: a world is written into a folder under a temporary name that is renamed once
    complete (`cached_folder`), so a file-by-file atomic write would only add time.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    render(scene, settings.image_size).save(root / "images" / f"{name}.png", format="PNG")
    rng = np.random.default_rng(scene_rng(settings, "features", name).getrandbits(64))
    np.savez_compressed(root / "features" / f"{name}.npz", **region_features(scene, settings, rng))


def new_scene(settings: WorldSettings, *key: object) -> Scene:
    """The scene named by `key` (e.g. ("nlvr2", "train", 12, 0)), the same on every run."""
    return sample_scene(scene_rng(settings, "scene", *key), settings)
