"""The built-in world: scenes of coloured shapes, rendered as PNGs and as detector-like region
features, described in a small word-level language."""

from __future__ import annotations

from typing import Any

from vl_prune.backbone import Backbone
from vl_prune.world import World
from vl_prune_plugins.world.scenes import WorldSettings
from vl_prune_plugins.world.vocabulary import words


class SyntheticWorld(World):
    """Every task's split in its official layout, and θ0 by MLM + ITM (+ MRFR) on captions."""

    description = "scenes of coloured shapes: PNGs, region features, every task's official layout"
    img_dim = WorldSettings.img_dim
    image_size = WorldSettings.image_size

    def tokenizer(self) -> Any:
        from vl_prune_plugins.world.tokenizer import world_tokenizer

        return world_tokenizer()

    @property
    def vocab_size(self) -> int:
        return len(words())

    def theta0(self, backbone_class: type[Backbone], name: str) -> Backbone:
        from vl_prune_plugins.world.theta0 import pretrained_tiny

        return pretrained_tiny(backbone_class, name)
