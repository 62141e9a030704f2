"""Physically remove cut heads and neurons: a structured ticket becomes a smaller dense model.

A unit whose output slice is pruned adds nothing to its block's output (its input side may
still make values, which the zero output weights then drop), so removing its rows and columns
from every part leaves the model's outputs as they were with the mask. The parts' linear
layers are narrowed in place: the blocks a backbone declares keep pointing at them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune.errors import VLPruneError
from vl_prune.pruning.layout import is_parameter, prune_hook
from vl_prune.pruning.structured import HEADS, Block, alive_units


def shrink(structure: Sequence[Block]) -> list[int]:
    """Remove every block's cut units (masks baked in first, so the parts are plain linear
    layers after); the number of units each block keeps. An attention block keeps at least one
    head, which has nothing alive if all were cut: attention cannot run with none."""
    kept = []
    for block in structure:
        keep = alive_units(block)
        if block.kind == HEADS and not keep.any():
            keep[0] = True
        for linear, _ in block.parts:
            _bake(linear)
        _narrow(block, keep)
        kept.append(int(keep.sum()))
    return kept


def fit_to(model: nn.Module, structure: Sequence[Block], state: Mapping[str, torch.Tensor]) -> None:
    """Narrow a fresh `model`'s blocks to the shapes of a shrunk model's weights (`state`, by
    parameter path in `model`), keeping the first units: loading `state` then fills them."""
    paths = {id(module): path for path, module in model.named_modules()}
    for block in structure:
        linear, dim = block.parts[0]
        name = f"{paths[id(linear)]}.weight"
        if name not in state:
            raise VLPruneError(f"the shrunk weights have no tensor {name!r}")
        size = state[name].shape[dim]
        units, extra = divmod(size, block.width)
        least = 1 if block.kind == HEADS else 0  # as `shrink` leaves them
        if extra or not least <= units <= block.units:
            raise VLPruneError(
                f"tensor {name!r}: {size} {'rows' if dim == 0 else 'columns'} are not whole "
                f"{block.kind} of {block.width} (at most {block.units})"
            )
        keep = torch.zeros(block.units, dtype=torch.bool)
        keep[:units] = True
        _narrow(block, keep)


def _bake(linear: nn.Linear) -> None:
    """`prune.remove` on a pruned weight: the masked values become the parameter."""
    _, hook = prune_hook(linear, "weight")
    if hook is not None:
        prune.remove(linear, "weight")
    elif not is_parameter(linear, "weight"):
        raise VLPruneError("a block's weight is neither a parameter nor pruned")


def _narrow(block: Block, keep: torch.Tensor) -> None:
    width = block.width
    index = torch.arange(block.units * width).view(block.units, width)[keep].reshape(-1)
    for linear, dim in block.parts:
        with torch.no_grad():
            weight = linear.weight.index_select(dim, index.to(linear.weight.device))
            linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
            if dim == 0 and linear.bias is not None:
                bias = linear.bias.index_select(0, index.to(linear.bias.device))
                linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
        linear.out_features, linear.in_features = linear.weight.shape
    count = int(keep.sum())
    if block.owner is not None:
        block.owner.num_attention_heads = count
        for name in ("all_head_size", "head_size"):
            if hasattr(block.owner, name):
                setattr(block.owner, name, count * width)
    block.units = count
