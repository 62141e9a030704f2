"""The world's retrieval split: `dataset_world.json` in Karpathy's layout, splits `train` and
`val`, five captions an image, each naming every object of its scene, with the images' pictures
and region features. No two images of a split hold the same objects, so every caption is true of
its own image only."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

from vl_prune.world import WorldSplit
from vl_prune_plugins.tasks.annotations import write_json
from vl_prune_plugins.tasks.karpathy import karpathy_image
from vl_prune_plugins.world import VERSION
from vl_prune_plugins.world.images import new_scene, scene_rng, write_image
from vl_prune_plugins.world.language import number
from vl_prune_plugins.world.scenes import Scene, WorldSettings
from vl_prune_plugins.world.vocabulary import plural

#: images per split of the world; each has five captions
WORLD_SIZES = {"train": 1000, "val": 50}


def write(out: Path, seed: int = 0) -> None:
    """The split's files under `out`, the same bytes for the same seed."""
    settings = WorldSettings(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    images, sentence_id = [], 0
    for split, size in WORLD_SIZES.items():
        rng = scene_rng(settings, "retrieval", split)
        seen = set()
        for i in range(size):
            # Captions name every object: scenes holding the same objects would share them.
            for attempt in itertools.count():
                scene = new_scene(settings, "retrieval", split, i, attempt)
                if _objects(scene) not in seen:
                    break
            seen.add(_objects(scene))
            name = f"world_{split}_{i:06d}"
            write_image(scene, name, out, settings)
            pairs = [
                (raw, [word for word in raw.split() if word not in (",", ".")])
                for raw in _world_captions(scene, rng)
            ]
            images.append(karpathy_image(len(images), sentence_id, split, f"{name}.png", pairs))
            sentence_id += len(pairs)
    write_json(out / "dataset_world.json", {"images": images, "dataset": "world"})


SPLIT = WorldSplit(
    write=write,
    # Batches of 250 pairs score the pool twice as fast as 64 on a CPU. Not a plateau from the
    # world θ0 (benchmarks/dense_plateau.py, 3 seeds, 2 threads): 0.796 ± 0.029 at 300 steps,
    # 0.844 ± 0.011 at 600 (45 s a run at 300); 0.892 ± 0.032 at 1,200, 0.929 ± 0.031 at 2,400
    # (155 s a run at 1,200): still not.
    recipe={"steps": 150, "lr": 1e-3, "batch_size": 32, "eval_batch_size": 250},
    version=VERSION,
    description="Flickr30k-style Karpathy split: five captions naming every object of a scene",
)


def _world_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions of a world scene, each naming every object by size, colour and shape, in a
    random order and one of five wordings: true of exactly the scenes holding the same objects."""
    n = len(scene.things)
    wordings = (
        "{} .",
        "the image contains {} .",
        f"there {'is' if n == 1 else 'are'} {number(n)} object{'' if n == 1 else 's'} , {{}} .",
        "a picture of {} .",
        "a scene with {} .",
    )
    return [wording.format(_listing(scene, rng)) for wording in wordings]


def _listing(scene: Scene, rng: random.Random) -> str:
    """ "two small red circles , a large blue star and a small red square", in random order."""
    phrases = [
        f"a {size} {colour} {shape}" if k == 1 else f"{number(k)} {size} {colour} {plural(shape)}"
        for (size, colour, shape), k in Counter(
            (t.size, t.colour, t.shape) for t in scene.things
        ).items()
    ]
    rng.shuffle(phrases)
    if len(phrases) == 1:
        return phrases[0]
    return f"{' , '.join(phrases[:-1])} and {phrases[-1]}"


def _objects(scene: Scene) -> tuple:
    """What the captions say of a scene: its objects, ignoring where they are."""
    return tuple(sorted((t.size, t.colour, t.shape) for t in scene.things))
