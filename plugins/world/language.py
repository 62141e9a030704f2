"""What the world says about its scenes: captions, true/false statements, questions and answers.

Every sentence is computed from the scene, so its truth or answer is exact; the words are all in
`vocabulary.words()`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vl_prune_plugins.world.scenes import Scene, WorldSettings
from vl_prune_plugins.world.vocabulary import NUMBERS, plural

NUMBER_WORDS = NUMBERS[1:]  # "zero" .. "eight"


def number(n: int) -> str:
    return NUMBER_WORDS[n]


def captions(scene: Scene) -> list[str]:
    """Every presence statement true of the scene (each colour, each shape it holds) and its
    object count, in a fixed order. Written together as an image's captions, they let a
    reader tell a false caption (one not in the list) from a true one: real negatives for
    image–text matching."""
    colours = sorted({t.colour for t in scene.things})
    shapes = sorted({t.shape for t in scene.things})
    n = len(scene.things)
    return [
        *(f"the image contains a {colour} object ." for colour in colours),
        *(f"the image contains a {shape} ." for shape in shapes),
        f"there {'is' if n == 1 else 'are'} {number(n)} object{'' if n == 1 else 's'} .",
    ]


Predicate = Callable[[Scene, Scene], bool]


def _side_contains(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    side = rng.choice(("left", "right"))
    if rng.random() < 0.5:
        colour = rng.choice(settings.colour_names)

        def holds(left: Scene, right: Scene) -> bool:
            return (left if side == "left" else right).count(colour=colour) > 0

        return f"the {side} image contains a {colour} object .", holds
    shape = rng.choice(settings.shape_names)

    def has_shape(left: Scene, right: Scene) -> bool:
        return (left if side == "left" else right).count(shape) > 0

    return f"the {side} image contains a {shape} .", has_shape


def _side_lacks(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    side = rng.choice(("left", "right"))
    colour = rng.choice(settings.colour_names)

    def holds(left: Scene, right: Scene) -> bool:
        return (left if side == "left" else right).count(colour=colour) == 0

    return f"the {side} image has no {colour} objects .", holds


def _contain(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    shape = rng.choice(settings.shape_names)
    if rng.random() < 0.5:
        return f"both images contain a {shape} .", lambda a, b: a.count(shape) * b.count(shape) > 0
    return (
        f"at least one image contains a {shape} .",
        lambda a, b: a.count(shape) + b.count(shape) > 0,
    )


def _more(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    shape = rng.choice(settings.shape_names)
    return (
        f"the left image has more {plural(shape)} than the right image .",
        lambda a, b: a.count(shape) > b.count(shape),
    )


def _total(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    colour = rng.choice(settings.colour_names)
    n = rng.randint(1, 4)
    return (
        f"there are at least {number(n)} {colour} objects in the two images .",
        lambda a, b: a.count(colour=colour) + b.count(colour=colour) >= n,
    )


def _more_objects(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    return (
        "the left image has more objects than the right image .",
        lambda a, b: a.count() > b.count(),
    )


def _total_objects(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    n = rng.randint(3, 6)
    return (
        f"there are at least {number(n)} objects in the two images .",
        lambda a, b: a.count() + b.count() >= n,
    )


def _side_count(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    side, n = rng.choice(("left", "right")), rng.randint(2, 3)

    def holds(left: Scene, right: Scene) -> bool:
        return (left if side == "left" else right).count() >= n

    return f"the {side} image has at least {number(n)} objects .", holds


# How many objects the images hold: tiny models learn these from their world θ0 within a few
# hundred steps. Statements naming a colour or shape need text–region matching, which they
# barely learn on a CPU budget; they are a quarter of the sentences.
COUNTING = (_more_objects, _total_objects, _side_count)
ATTRIBUTES = (_side_contains, _side_lacks, _contain, _more, _total)


def statement(rng: random.Random, settings: WorldSettings) -> tuple[str, Predicate]:
    """A sentence about an image pair and the test of its truth. It is drawn before any image:
    the NLVR2 writer then draws image pairs until the truth is the label it wants, so the words
    alone say nothing about the label (no language prior to learn instead of the images)."""
    family = COUNTING if rng.random() < 0.75 else ATTRIBUTES
    return rng.choice(family)(rng, settings)


def question(scene: Scene, rng: random.Random, settings: WorldSettings) -> tuple[str, str, str]:
    """A question about the scene: (question, answer, answer type as in VQA v2)."""
    kind = rng.choice(("count", "count", "yes/no", "colour", "shape"))
    if kind == "count":
        if rng.random() < 0.5:
            colour = rng.choice(settings.colour_names)
            return (
                f"how many {colour} objects are there ?",
                number(scene.count(colour=colour)),
                "number",
            )
        shape = rng.choice(settings.shape_names)
        return f"how many {plural(shape)} are there ?", number(scene.count(shape)), "number"
    if kind == "yes/no":
        shape, colour = rng.choice(settings.shape_names), rng.choice(settings.colour_names)
        if rng.random() < 0.5:  # ask about something present half of the time
            thing = rng.choice(scene.things)
            shape, colour = thing.shape, thing.colour
        answer = "yes" if scene.count(shape, colour) else "no"
        return f"is there a {colour} {shape} ?", answer, "yes/no"
    thing = rng.choice(scene.things)
    if kind == "colour" and scene.count(thing.shape) == 1:
        return f"what colour is the {thing.shape} ?", thing.colour, "other"
    if scene.count(colour=thing.colour) == 1:
        return f"what shape is the {thing.colour} object ?", thing.shape, "other"
    return f"how many {plural(thing.shape)} are there ?", number(scene.count(thing.shape)), "number"


def human_answers(answer: str, kind: str, rng: random.Random, settings: WorldSettings) -> list[str]:
    """Ten annotators' answers: most give the right one, a few a plausible wrong one."""
    choices = {
        "number": NUMBER_WORDS[:7],
        "yes/no": ("yes", "no"),
        "other": settings.colour_names if answer in settings.colour_names else settings.shape_names,
    }[kind]
    wrong = [c for c in choices if c != answer]
    return [answer if rng.random() < 0.85 else rng.choice(wrong) for _ in range(10)]
