"""The world's captions in the Karpathy split json (`dataset_world.json`): what θ0 is
pre-trained on, and what `vlprune find --task pretrain` prunes with."""

from __future__ import annotations

from pathlib import Path

from vl_prune.world import WorldSplit
from vl_prune_plugins.tasks.annotations import write_json
from vl_prune_plugins.tasks.karpathy import karpathy_image
from vl_prune_plugins.world import VERSION
from vl_prune_plugins.world.images import new_scene, write_image
from vl_prune_plugins.world.language import captions
from vl_prune_plugins.world.scenes import WorldSettings
from vl_prune_plugins.world.theta0 import THETA0

WORLD_SIZES = {"train": 3000, "dev": 500}


def write(out: Path, seed: int = 0) -> None:
    settings = WorldSettings(seed=seed)
    images, sentence_id = [], 0
    for split, size in WORLD_SIZES.items():
        for i in range(size):
            name = f"world_{split}_{i:06d}"
            scene = new_scene(settings, "pretrain", split, i)
            write_image(scene, name, out, settings)
            # Every true statement `captions` makes: a caption missing from an image's list is
            # false of it, so ITM negatives are real negatives (see `Pretrain.collate`).
            pairs = [(raw, raw.rstrip(" .").split()) for raw in captions(scene)]
            images.append(karpathy_image(len(images), sentence_id, split, f"{name}.png", pairs))
            sentence_id += len(pairs)
    write_json(out / "dataset_world.json", {"images": images, "dataset": "world"})


SPLIT = WorldSplit(
    write=write,
    # `vlprune find --task pretrain` (task-agnostic tickets): each round continues pre-training
    # for a quarter of θ0's steps, as the paper gives each IMP round a fraction of pre-training.
    recipe={"steps": THETA0.steps // 4, "lr": THETA0.lr, "batch_size": THETA0.batch_size},
    version=VERSION,
    description="captions of 3,500 scenes in the Karpathy split json",
)
