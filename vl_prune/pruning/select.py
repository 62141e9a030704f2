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
from collections.abc import Callable, Sequence

import torch

KeyFn = Callable[[], torch.Tensor]
_BUCKETS = 1 << 16


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


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys ordered like |scores|: the float32 bit pattern with the sign bit cleared."""
    return scores.detach().float().reshape(-1).view(torch.int32) & 0x7FFFFFFF


def split_smallest(key_fns: Sequence[KeyFn], k: int) -> tuple[int, list[int]]:
    """The k-th smallest key (1-based) over all tensors, and how many of the k smallest each holds.

    `key_fns` recompute each tensor's keys on demand, so no key tensor outlives its pass. Keys
    equal to the k-th are taken in tensor order, then index order, so the counts add up to k.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    high = None
    for key_fn in key_fns:
        keys = key_fn()
        counts = torch.bincount(keys >> 16, minlength=_BUCKETS)
        high = counts if high is None else high + counts
    if high is None or int(high.sum()) < k:
        raise ValueError(f"k={k} is more than the number of keys")
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below_bucket = int(cumulative[bucket - 1]) if bucket else 0

    per_tensor = []
    low = torch.zeros_like(high)
    for key_fn in key_fns:
        keys = key_fn()
        upper = keys >> 16
        lows = keys[upper == bucket] & 0xFFFF
        low += torch.bincount(lows, minlength=_BUCKETS)
        per_tensor.append((int(torch.count_nonzero(upper < bucket)), lows))
    offset = int(torch.searchsorted(low.cumsum(0), k - below_bucket))

    counts, ties_left = [], k - below_bucket - int(low[:offset].sum())
    for below, lows in per_tensor:
        ties = min(int(torch.count_nonzero(lows == offset)), ties_left)
        ties_left -= ties
        counts.append(below + int(torch.count_nonzero(lows < offset)) + ties)
    return (bucket << 16) | offset, counts
