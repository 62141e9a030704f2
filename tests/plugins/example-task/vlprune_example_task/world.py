"""Count's split of the embedded world: pictures of 1 to 4 coloured squares, their region
features and `count_train.json` / `count_dev.json`, written in the layout `Count` reads.

Everything the world's backbones read comes from `embedded_world()`: the picture size, the
feature width and, through its words, the questions' vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vl_prune.world import WorldSplit, embedded_world

SIZES = {"train": 64, "dev": 32}
NUMBERS = ("one", "two", "three", "four")
COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40))


def write(out: Path, seed: int) -> None:
    """Both splits under `out`; the same examples for the same seed."""
    world = embedded_world()
    rng = np.random.default_rng(seed)
    # A detector's view of a square: a direction per colour, plus noise.
    directions = np.random.default_rng(seed + 1).standard_normal((len(COLOURS), world.img_dim))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "features").mkdir(exist_ok=True)
    for split, size in SIZES.items():
        questions = []
        for i in range(size):
            image = f"{split}_{i:06d}"
            count = int(rng.integers(1, len(NUMBERS) + 1))
            _write_image(out, image, count, rng, world.image_size, directions)
            wrong = [n for n in range(1, len(NUMBERS) + 1) if n != count]
            asked = count if rng.random() < 0.5 else int(rng.choice(wrong))
            questions.append(
                {
                    "question_id": i,
                    "image_id": image,
                    "question": f"are there {NUMBERS[asked - 1]} shapes ?",
                    "answer": "yes" if asked == count else "no",
                }
            )
        document = {"info": {"dataset": "count", "split": split}, "questions": questions}
        (out / f"count_{split}.json").write_text(json.dumps(document))


def _write_image(
    out: Path, image: str, count: int, rng: np.random.Generator, side: int, directions: np.ndarray
) -> None:
    """`images/<image>.png` and `features/<image>.npz` (`features` N × img_dim float16,
    `norm_bb` N × 6: x1, y1, x2, y2, w, h normalised, `conf`) of `count` squares."""
    colours = rng.integers(len(COLOURS), size=count)
    corners = rng.uniform(0.0, 0.75, size=(count, 2))
    boxes = np.concatenate([corners, corners + 0.25], axis=1)
    picture = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(picture)
    for colour, box in zip(colours, boxes, strict=True):
        draw.rectangle((box * side).tolist(), fill=COLOURS[colour])
    picture.save(out / "images" / f"{image}.png")
    features = directions[colours] + 0.3 * rng.standard_normal((count, directions.shape[1]))
    np.savez_compressed(
        out / "features" / f"{image}.npz",
        features=features.astype(np.float16),
        norm_bb=np.concatenate([boxes, boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float32),
        conf=rng.uniform(0.5, 1.0, size=count).astype(np.float32),
    )


SPLIT = WorldSplit(
    write=write,
    recipe={"steps": 100, "lr": 2e-3, "batch_size": 32},
    version=1,
    description="Count: yes/no questions on how many squares 96 pictures hold",
)
