"""Exact k-smallest selection over many tensors without concatenating them.

Magnitude pruning needs the k-th smallest score among tens of millions of weights spread over
many tensors. `torch.cat` + `topk` (what `prune.global_unstructured` does) costs a full copy and a
sort, and breaks past 2**31 elements. Here the scores' float32 bit patterns are used as integer
keys (for non-negative floats the order is the same) and found in two 16-bit histogram passes:
the high half first, then the low half within the one bucket that holds the k-th key. Every
temporary is the size of one tensor; the histograms hold 65536 int64 counts.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

_BUCKETS = 1 << 16
DEAD = 0x7F800000  # the key of +inf: never among the smallest


def check_amount(amount: float | int) -> None:
    """Reject what torch.nn.utils.prune rejects: a negative count, a fraction outside [0, 1]."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be an int or a float, got {amount!r}")
    if isinstance(amount, numbers.Integral) and amount < 0:
        raise ValueError(f"amount={amount} must be a non-negative integer")
    if not isinstance(amount, numbers.Integral) and not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount={amount} must be a fraction in [0, 1]")


def count_to_prune(amount: float | int, alive: int) -> int:
    """How many weights `amount` asks for among `alive` ones, with torch.nn.utils.prune's rules."""
    check_amount(amount)
    if isinstance(amount, numbers.Integral):
        if amount > alive:
            raise ValueError(f"amount={amount} is more than the {alive} weights still alive")
        return int(amount)
    return round(amount * alive)


def score_keys(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat int32 keys ordered like |scores|: the float32 bit pattern with the sign bit cleared."""
    bits = scores.detach().float().reshape(-1).view(torch.int32)
    if out is None:
        return bits & 0x7FFFFFFF
    return torch.bitwise_and(bits, 0x7FFFFFFF, out=out[: bits.numel()])


def key_value(key: int) -> float:
    """The float whose magnitude a key stands for."""
    return torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


def count_true(mask: torch.Tensor) -> int:
    """Number of True entries (count_nonzero: summing bools is twenty times slower)."""
    return int(torch.count_nonzero(mask))


class _Passes:
    """Walks the keys of every tensor in reused buffers (fresh memory per tensor costs more in
    page faults than the arithmetic itself); dead weights get the key of +inf."""

    def __init__(self, scores: Sequence[torch.Tensor], alive: Sequence[torch.Tensor | None]):
        self.scores, self.alive = scores, alive
        largest = max(s.numel() for s in scores)
        device = scores[0].device
        self.keys = torch.empty(largest, dtype=torch.int32, device=device)
        self.upper = torch.empty(largest, dtype=torch.int32, device=device)
        self.flags = torch.empty(largest, dtype=torch.bool, device=device)

    def __iter__(self):
        for scores, alive in zip(self.scores, self.alive, strict=True):
            keys = score_keys(scores, out=self.keys)
            flags = self.flags[: keys.numel()]
            if alive is not None:
                keys.masked_fill_(torch.logical_not(alive.reshape(-1), out=flags), DEAD)
            upper = torch.bitwise_right_shift(keys, 16, out=self.upper[: keys.numel()])
            yield keys, upper, flags


def split_smallest(
    scores: Sequence[torch.Tensor], k: int, alive: Sequence[torch.Tensor | None] | None = None
) -> tuple[int, list[int]]:
    """The key of the k-th smallest |score| (1-based) among alive weights over all tensors,
    and how many of the k smallest each tensor holds.

    `alive` holds a bool mask per tensor (None: all alive). Scores equal to the k-th are taken
    in tensor order, then index order, so the counts add up to exactly k.
    """
    alive = list(alive) if alive is not None else [None] * len(scores)
    available = sum(
        s.numel() if a is None else count_true(a) for s, a in zip(scores, alive, strict=True)
    )
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be between 1 and the {available} alive scores")
    passes = _Passes(scores, alive)
    # Per-tensor histograms (512 KiB each) give each tensor's count below the bucket for free.
    histograms = [torch.bincount(upper, minlength=_BUCKETS) for _, upper, _ in passes]
    cumulative = torch.stack(histograms).sum(0).cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below_bucket = int(cumulative[bucket - 1]) if bucket else 0

    per_tensor = []
    low = torch.zeros_like(cumulative)
    for (keys, upper, flags), histogram in zip(passes, histograms, strict=True):
        lows = keys[torch.eq(upper, bucket, out=flags)] & 0xFFFF
        low += torch.bincount(lows, minlength=_BUCKETS)
        per_tensor.append((int(histogram[:bucket].sum()), lows))
    offset = int(torch.searchsorted(low.cumsum(0), k - below_bucket))

    counts, ties_left = [], k - below_bucket - int(low[:offset].sum())
    for below, lows in per_tensor:
        ties = min(count_true(lows == offset), ties_left)
        ties_left -= ties
        counts.append(below + count_true(lows < offset) + ties)
    return (bucket << 16) | offset, counts
