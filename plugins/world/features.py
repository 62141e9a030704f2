"""Detector-like region features of a scene, in UNITER's npz layout.

Each object becomes a region whose feature is a fixed random projection of its attributes
(shape, colour, size) plus noise; a few distractor regions carry noise only and low confidence.
Regions come in random order, as a detector's would.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from vl_prune_plugins.world.scenes import SIZES, Scene, WorldSettings
from vl_prune_plugins.world.vocabulary import COLOURS, SHAPES

_ATTRIBUTES = len(SHAPES) + len(COLOURS) + len(SIZES)


@cache
def _projection(img_dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, img_dim, 7919])
    return rng.standard_normal((_ATTRIBUTES, img_dim)) * (2.0 / np.sqrt(_ATTRIBUTES))


def _attributes(shape: str, colour: str, size: str) -> np.ndarray:
    vector = np.zeros(_ATTRIBUTES)
    vector[SHAPES.index(shape)] = 1
    vector[len(SHAPES) + COLOURS.index(colour)] = 1
    vector[len(SHAPES) + len(COLOURS) + SIZES.index(size)] = 1
    return vector


def region_features(scene: Scene, settings: WorldSettings, rng: np.random.Generator) -> dict:
    """`features` (N × img_dim float16), `norm_bb` (N × 6: x1, y1, x2, y2, w, h) and `conf`."""
    projection = _projection(settings.img_dim, settings.seed)
    features, boxes, confidence = [], [], []
    for thing in scene.things:
        features.append(_attributes(thing.shape, thing.colour, thing.size) @ projection)
        boxes.append(thing.box())
        confidence.append(rng.uniform(0.6, 0.99))
    for _ in range(settings.distractors):
        features.append(np.zeros(settings.img_dim))
        x, y = rng.uniform(0, 0.8, size=2)
        w, h = rng.uniform(0.1, 0.2, size=2)
        boxes.append((x, y, x + w, y + h))
        confidence.append(rng.uniform(0.2, 0.5))
    feats = np.asarray(features) + settings.feature_noise * rng.standard_normal(
        (len(features), settings.img_dim)
    )
    xyxy = np.asarray(boxes, dtype=np.float32)
    norm_bb = np.concatenate([xyxy, xyxy[:, 2:3] - xyxy[:, 0:1], xyxy[:, 3:4] - xyxy[:, 1:2]], 1)
    order = rng.permutation(len(features))
    return {
        "features": feats[order].astype(np.float16),
        "norm_bb": norm_bb[order],
        "conf": np.asarray(confidence, dtype=np.float32)[order],
    }
