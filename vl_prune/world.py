"""The world contract: the embedded default that runs when no --data or --checkpoint is given.

A world (entry-point group `vl_prune.worlds`) gives pre-trained weights θ0 to any backbone class
with a `tiny` preset and publishes what a tiny preset reads: its tokenizer, the region feature
width and the image size. Each task's split of the world is a `WorldSplit` registered under
`vl_prune.world_splits` with the task's name: it writes the split in the task's official layout
and says how to fine-tune on it. A task or backbone plugin needs no world code of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vl_prune import registry
from vl_prune.errors import VLPruneError

if TYPE_CHECKING:
    from vl_prune.backbone import Backbone


@dataclass(frozen=True)
class WorldSplit:
    """A task's split of the embedded world."""

    #: writes the split into an empty folder, in the task's official layout: write(out, seed)
    write: Callable[[Path, int], None]
    #: how to fine-tune on it: `vl_prune.train.TrainSettings` fields (flags override them)
    recipe: Mapping[str, Any]
    #: changes whenever `write` writes something else: cached splits are keyed by it
    version: int
    #: one line for `vlprune list world_splits`
    description: str = ""
    #: a backbone's changes to `recipe`, by its registry name: a tiny model that learns the
    #: split at another pace needs its own steps to reach its plateau, as real backbones come
    #: with their own fine-tuning settings
    backbone_recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class World:
    """Base class of world plugins: data, θ0 and recipes for the embedded default."""

    #: one line for `vlprune list worlds`
    description: ClassVar[str] = ""
    #: the width of the world's region features and the side of its images, in pixels: what a
    #: backbone's tiny preset must read
    img_dim: ClassVar[int] = 0
    image_size: ClassVar[int] = 0

    def tokenizer(self) -> Any:
        """The tokenizer of the world's vocabulary (a transformers fast tokenizer)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Words in the world's vocabulary: a tiny preset's word embedding has this many rows."""
        return len(self.tokenizer())

    def theta0(self, backbone_class: type[Backbone], name: str) -> Backbone:
        """`backbone_class`'s tiny preset pre-trained on the world (`name` is its registry
        name): built on first use, deterministically, and cached."""
        raise NotImplementedError

    def split(self, task: str) -> WorldSplit:
        """The world's split of `task`."""
        from vl_prune.train import TrainSettings

        if not any(p.name == task for p in registry.plugins("world_splits")):
            registry.find("tasks", task)  # an unknown task is named with its closest matches
            raise VLPruneError(
                f"the embedded world has no {task} split; pass --data with the task's files"
            )
        plugin = registry.find("world_splits", task)
        split = plugin.load()
        if not isinstance(split, WorldSplit):
            raise VLPruneError(
                f"world split {task!r} (from {plugin.distribution}) is a {type(split).__name__}, "
                "not a vl_prune.world.WorldSplit"
            )
        where = f"world split {task!r} (from {plugin.distribution})"
        if not isinstance(split.backbone_recipes, Mapping):
            raise VLPruneError(
                f"{where} has backbone_recipes of type {type(split.backbone_recipes).__name__}, "
                "not a mapping of backbone names to recipes"
            )
        recipes = {"recipe": split.recipe}
        recipes.update((f"{name}'s recipe", r) for name, r in split.backbone_recipes.items())
        for said, recipe in recipes.items():
            if not isinstance(recipe, Mapping):
                raise VLPruneError(
                    f"{where} has {said} of type {type(recipe).__name__}, not a mapping of "
                    "TrainSettings fields"
                )
            if unknown := TrainSettings.unknown(recipe):
                raise VLPruneError(
                    f"{where} has {said} keys {', '.join(map(repr, unknown))}, which are not "
                    "TrainSettings fields"
                )
        return split

    def data(self, task: str, seed: int = 0) -> Path:
        """The folder of `task`'s split, written on first use and cached."""
        from vl_prune.home import cached_folder

        split = self.split(task)
        name = f"world/{task}-v{split.version}-seed{seed}"
        return cached_folder(name, lambda out: split.write(out, seed))

    def recipe(self, task: str, backbone: str | None = None) -> dict[str, Any]:
        """How to fine-tune on `task`'s split (`backbone`, a registry name, with its changes)."""
        split = self.split(task)
        return {**split.recipe, **split.backbone_recipes.get(backbone, {})}


@cache
def embedded_world() -> World:
    """The installed world: the only one registered, or the one `$VL_PRUNE_WORLD` names."""
    name = os.environ.get("VL_PRUNE_WORLD")
    if name is None:
        names = [p.name for p in registry.plugins("worlds")]
        if len(names) != 1:
            found = ", ".join(names) or "none"
            raise VLPruneError(
                f"{len(names)} worlds are installed ({found}): set VL_PRUNE_WORLD to one of them"
            )
        (name,) = names
    world_class = registry.load("worlds", name)
    if not (isinstance(world_class, type) and issubclass(world_class, World)):
        plugin = registry.find("worlds", name)
        raise VLPruneError(
            f"world {name!r} (from {plugin.distribution}) is not a vl_prune.world.World subclass"
        )
    return world_class()
