"""Scenes of the embedded world: a few coloured shapes on a canvas, sampled from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from vl_prune_plugins.world.vocabulary import COLOURS, SHAPES

SIZES = ("small", "large")


@dataclass(frozen=True)
class WorldSettings:
    """Everything that decides a world; the same settings always give the same files.

    The defaults make the tasks learnable by a tiny model in a few hundred steps but not
    trivially: region features are noisy projections of the objects' attributes. (With 6 shapes
    × 6 colours, noise 0.6 and 3 distractor regions, a tiny UNITER stays at chance on "does the
    image contain X" for thousands of steps: the text–region interaction never gets learnt.)
    """

    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    shapes: int = 4
    colours: int = 4
    distractors: int = 0
    feature_noise: float = 0.3
    img_dim: int = 64
    image_size: int = 64

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 2 <= self.shapes <= len(SHAPES) or not 2 <= self.colours <= len(COLOURS):
            raise ValueError(f"shapes and colours must be in 2..{len(SHAPES)}")

    @property
    def shape_names(self) -> tuple[str, ...]:
        return SHAPES[: self.shapes]

    @property
    def colour_names(self) -> tuple[str, ...]:
        return COLOURS[: self.colours]


@dataclass(frozen=True)
class Thing:
    """One object: what it is and where (centre x, y in [0, 1], y growing downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return 0.09 if self.size == "small" else 0.15

    def box(self) -> tuple[float, float, float, float]:
        """x1, y1, x2, y2, normalised to the canvas."""
        r = self.radius
        return (
            max(0.0, self.x - r),
            max(0.0, self.y - r),
            min(1.0, self.x + r),
            min(1.0, self.y + r),
        )

    def matches(self, shape: str | None = None, colour: str | None = None) -> bool:
        return (shape is None or self.shape == shape) and (colour is None or self.colour == colour)


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(t.matches(shape, colour) for t in self.things)


def sample_scene(rng: random.Random, settings: WorldSettings) -> Scene:
    """A scene of min..max objects placed on a 4 × 4 grid (no overlaps), with jitter."""
    count = rng.randint(settings.min_objects, settings.max_objects)
    cells = rng.sample(range(16), count)
    things = []
    for cell in cells:
        row, column = divmod(cell, 4)
        things.append(
            Thing(
                shape=rng.choice(settings.shape_names),
                colour=rng.choice(settings.colour_names),
                size=rng.choice(SIZES),
                x=(column + 0.5 + rng.uniform(-0.1, 0.1)) / 4,
                y=(row + 0.5 + rng.uniform(-0.1, 0.1)) / 4,
            )
        )
    return Scene(tuple(things))
