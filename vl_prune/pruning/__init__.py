"""Pruning methods on torch.nn.utils.prune, exact group selection, and schedules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vl_prune.pruning.aliases import MethodAlias
from vl_prune.pruning.layout import alive_mask
from vl_prune.pruning.methods import (
    BoolMaskPruning,
    GlobalMagnitude,
    GlobalRandom,
    KeepMask,
    LayerwiseMagnitude,
    NMMagnitude,
    ScorePruning,
)
from vl_prune.pruning.schedules import SCHEDULES, geometric, linear

__all__ = [
    "SCHEDULES",
    "BoolMaskPruning",
    "GlobalMagnitude",
    "GlobalRandom",
    "KeepMask",
    "LayerwiseMagnitude",
    "MethodAlias",
    "NMMagnitude",
    "ScorePruning",
    "alive_mask",
    "count_pruned",
    "geometric",
    "linear",
    "prune_to",
]


def count_pruned(parameters: Sequence[tuple[nn.Module, str]]) -> int:
    """How many weights of the group are pruned (masked to zero) now."""
    pruned = 0
    for module, name in parameters:
        mask = alive_mask(module, name)
        if mask is not None:
            pruned += mask.numel() - int(torch.count_nonzero(mask))
    return pruned


def prune_to(
    parameters: Sequence[tuple[nn.Module, str]],
    method: type[BoolMaskPruning],
    target: int,
    **kwargs,
) -> None:
    """Prune the group until `target` of its original weights are gone (a schedule step):
    exactly, for `ScorePruning` methods; to whole units short of it, for structured ones."""
    parameters = list(parameters)
    done = count_pruned(parameters)
    if target < done:
        raise ValueError(f"target {target} is below the {done} weights already pruned")
    method.prune_group(parameters, target - done, **kwargs)
