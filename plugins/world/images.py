"""Writing one world image to disk: the PNG and its region features (UNITER's npz layout)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np

from vl_prune.files import atomic_write
from vl_prune_plugins.world.features import region_features
from vl_prune_plugins.world.render import render
from vl_prune_plugins.world.scenes import Scene, WorldSettings, sample_scene


def scene_rng(settings: WorldSettings, *key: object) -> random.Random:
    """A generator for one named thing of the world, independent of everything else drawn."""
    return random.Random(repr((settings.seed, *key)))


def write_image(scene: Scene, name: str, root: Path, settings: WorldSettings) -> None:
    """`root/images/<name>.png` and `root/features/<name>.npz`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    render(scene, settings.image_size).save(png, format="PNG")
    # No fsync: the world is cheap to write again, and half its writing time went to fsync.
    atomic_write(root / "images" / f"{name}.png", png.getvalue(), durable=False)
    rng = np.random.default_rng(scene_rng(settings, "features", name).getrandbits(64))
    npz = io.BytesIO()
    np.savez_compressed(npz, **region_features(scene, settings, rng))
    atomic_write(root / "features" / f"{name}.npz", npz.getvalue(), durable=False)


def new_scene(settings: WorldSettings, *key: object) -> Scene:
    """The scene named by `key` (e.g. ("nlvr2", "train", 12, 0)), the same on every run."""
    return sample_scene(scene_rng(settings, "scene", *key), settings)
