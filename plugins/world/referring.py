"""Referring expressions about the world's scenes, in RefCOCO+ style: appearance words only.

RefCOCO+ forbids absolute location words ("left", "top"), so an object is singled out by its
size, colour and shape alone: "the red circle", "the large blue star", "the green one".
"""

from __future__ import annotations

import itertools
import random

from vl_prune_plugins.world.scenes import Scene, Thing

ATTRIBUTES = ("size", "colour", "shape")
#: every non-empty set of attributes an expression can name, shortest first
CHOICES = [
    names for n in range(1, len(ATTRIBUTES) + 1) for names in itertools.combinations(ATTRIBUTES, n)
]
#: how often a speaker names one attribute more than needed, as people often do
OVERSPECIFY = 0.3


def matching(scene: Scene, target: Thing, names: tuple[str, ...]) -> list[Thing]:
    """The scene's objects that agree with `target` on the named attributes."""
    return [t for t in scene.things if all(getattr(t, n) == getattr(target, n) for n in names)]


def distinguishing(scene: Scene, target: Thing) -> list[tuple[str, ...]]:
    """The attribute sets that single `target` out; none if it has a twin in the scene."""
    return [names for names in CHOICES if matching(scene, target, names) == [target]]


def expression(scene: Scene, target: Thing, rng: random.Random) -> str | None:
    """An expression true of `target` alone (None if no words can tell it from a twin): one of
    the shortest that work, now and then with one attribute more."""
    found = distinguishing(scene, target)
    if not found:
        return None
    shortest = [names for names in found if len(names) == len(found[0])]
    names = set(rng.choice(shortest))
    spare = [n for n in ATTRIBUTES if n not in names]
    if spare and rng.random() < OVERSPECIFY:
        names.add(rng.choice(spare))
    return phrase(target, names, rng)


def phrase(target: Thing, names: set[str], rng: random.Random) -> str:
    """The words for the named attributes of `target`, in English order (size, colour, shape);
    without its shape the object is "one" or "object"."""
    words = [getattr(target, n) for n in ATTRIBUTES if n in names]
    if "shape" not in names:
        words.append(rng.choice(("one", "object")))
    return "the " + " ".join(words)
