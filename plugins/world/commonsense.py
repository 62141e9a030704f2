"""What the world asks in VCR's style: a question that refers to objects of a scene, four answers
and four rationales, each set with exactly one true choice.

Two kinds of question, half of each: "how many objects are in the image with [k] ?" (answer:
"there are n objects .", a caption of the tiny models' pre-training; rationale: "[k] is c .",
its colour) and "what colour is [k] ?" (answer: "[k] is c ."; rationale: "there are m c
objects ."). Counting a scene's objects is what the tiny models learn first from their world θ0;
finding the colour of one named object, or counting by colour, takes text–region matching that
they learn slowly: each kind has an easier and a harder half, and Q→AR needs both.
References are index lists into the scene's objects, as in VCR; a referenced object's shape is
unique in its scene, so its class name alone says which object it is. The right choices are
drawn first and the scene is then drawn (or recoloured) to hold them, so the words alone say
nothing about which choice is right.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from vl_prune_plugins.world.language import number
from vl_prune_plugins.world.scenes import Scene, WorldSettings
from vl_prune_plugins.world.vocabulary import COLOURS

CHOICES = 4
#: how many objects of the referenced object's colour a scene may hold, or objects in all
COUNTS = (1, 2, 3, 4)

#: VCR's tokens: words, or lists of indices into the image's objects
Tokens = list[str | list[int]]


@dataclass(frozen=True)
class Question:
    """A question about a scene with its answer and rationale choices, as VCR lines hold them."""

    question: Tokens
    answers: list[Tokens]
    answer_label: int
    rationales: list[Tokens]
    rationale_label: int


def commonsense_question(
    rng: random.Random, settings: WorldSettings, scene: Callable[[int], Scene]
) -> tuple[Scene, Question]:
    """A question and the scene it is about; `scene(attempt)` draws the scene of each attempt."""
    if settings.max_objects < max(COUNTS):
        raise ValueError(f"VCR questions need scenes of up to {max(COUNTS)} objects")
    if rng.random() < 0.5:
        return _count_question(rng, settings, scene)
    return _colour_question(rng, settings, scene)


def _count_question(
    rng: random.Random, settings: WorldSettings, scene: Callable[[int], Scene]
) -> tuple[Scene, Question]:
    """ "how many objects are there other than [k] ?": scenes are drawn until one holds the
    number of objects drawn beforehand and an object to refer to."""
    total = rng.choice(COUNTS)
    for attempt in itertools.count():
        drawn = scene(attempt)
        unique = _unique(drawn)
        if unique and len(drawn.things) == total:
            break
    k = rng.choice(unique)
    counts, count_label = _shuffled(rng, list(COUNTS), total)
    colours, colour_label = _colours(rng, settings, drawn.things[k].colour)
    return drawn, Question(
        ["how", "many", "objects", "are", "in", "the", "image", "with", [k], "?"],
        [_there_are(n) for n in counts],
        count_label,
        [[[k], "is", c, "."] for c in colours],
        colour_label,
    )


def _colour_question(
    rng: random.Random, settings: WorldSettings, scene: Callable[[int], Scene]
) -> tuple[Scene, Question]:
    """ "what colour is [k] ?": scenes are drawn until one has enough objects and one to refer
    to, then recoloured so that [k] and exactly n objects in all have the colour drawn
    beforehand (drawing until a scene held both by chance took hundreds of scenes)."""
    colour, count = rng.choice(settings.colour_names), rng.choice(COUNTS)
    for attempt in itertools.count():
        drawn = scene(attempt)
        unique = _unique(drawn)
        if unique and len(drawn.things) >= count:
            break
    k = rng.choice(unique)
    same = {k, *rng.sample([i for i in range(len(drawn.things)) if i != k], count - 1)}
    others = [c for c in settings.colour_names if c != colour]
    drawn = Scene(
        tuple(
            replace(t, colour=colour if i in same else rng.choice(others))
            for i, t in enumerate(drawn.things)
        )
    )
    colours, colour_label = _colours(rng, settings, colour)
    counts, count_label = _shuffled(rng, list(COUNTS), count)
    return drawn, Question(
        ["what", "colour", "is", [k], "?"],
        [[[k], "is", c, "."] for c in colours],
        colour_label,
        [_there_are(n, colour) for n in counts],
        count_label,
    )


def _unique(scene: Scene) -> list[int]:
    """The objects whose class name (shape) says which they are."""
    return [i for i, t in enumerate(scene.things) if scene.count(t.shape) == 1]


def _colours(rng: random.Random, settings: WorldSettings, colour: str) -> tuple[list[str], int]:
    """Four colour choices, `colour` among them, and its place."""
    # Wrong colours come from the vocabulary when the world has fewer than four.
    pool = [c for c in COLOURS[: max(CHOICES, settings.colours)] if c != colour]
    return _shuffled(rng, [colour, *rng.sample(pool, CHOICES - 1)], colour)


def _shuffled(rng: random.Random, choices: list, right: object) -> tuple[list, int]:
    rng.shuffle(choices)
    return choices, choices.index(right)


def _there_are(n: int, colour: str | None = None) -> Tokens:
    """ "there are n [colour] objects ." (the world's captions say "there are n objects .")."""
    words = [number(n)] if colour is None else [number(n), colour]
    if n == 1:
        return ["there", "is", *words, "object", "."]
    return ["there", "are", *words, "objects", "."]
