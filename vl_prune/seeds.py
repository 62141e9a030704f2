"""The random streams of a run, each derived from (seed, stream, index) by numpy's SeedSequence.

Every use of randomness draws from its own stream: the head's initialisation φ0, each epoch's
data order, the DataLoader's worker seeds, dropout, a batch's collation, a round's random
pruning, a baseline's shuffle. SeedSequence hashes the whole key, so no two keys share a stream:
with `seed + epoch`, epoch e of seed s shuffled as epoch e-1 of seed s+1, and the seeds of a
study were not independent runs.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

#: names this derivation in the keys of cached results trained with it (the world θ0)
SCHEME = "seedsequence-streams-2"


class Stream(enum.IntEnum):
    """What a stream is for; the numbers are part of every key (a change changes results)."""

    HEAD = 1
    ORDER = 2
    LOADER = 3
    DROPOUT = 4
    COLLATE = 5
    PRUNE = 6
    SHUFFLE = 7
    EVALUATE = 8
    LORA = 9


def seed_of(seed: int, stream: Stream, *index: int) -> int:
    """The seed (0 ≤ s < 2**63, what torch and numpy take) of one stream of a run's `seed`
    (0 ≤ seed < 2**32); `index` tells apart the uses of a stream (an epoch, a round, a batch's
    examples). The key holds the index's length: SeedSequence pads short keys with zeros, so
    (seed, stream) and (seed, stream, 0) would otherwise share a stream."""
    key = [seed, int(stream), len(index), *index]
    state = np.random.SeedSequence(key).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def seed_list(first: int, count: int) -> list[int]:
    """The seeds of `--seed first --seeds count`: first, first + 1, …, each the root of its own
    streams."""
    return list(range(first, first + count))


def over_seeds(scores: Sequence[float]) -> dict[str, Any]:
    """A score over seeds as results report it: the mean, the sample std (0 for one seed) and
    each seed's score."""
    return {
        "score": statistics.fmean(scores),
        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "scores": list(scores),
    }
