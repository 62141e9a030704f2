"""Structured pruning: whole attention heads and whole feed-forward neurons, in torch's layout.

A backbone declares its blocks (`Backbone.structure`): each attention block's heads are row
slices of its query, key and value weights and the matching column slices of its output
weight; each feed-forward neuron is a row of the inner weight and a column of the outer one.
The methods cut whole units by the L1 norm of their weights (the structured tickets of
Prasanna et al., 2020, "When BERT plays the lottery, all tickets are winning"); the masks are
ordinary bool masks in the ticket format, with whole rows and columns cut. A unit whose output
slice is cut adds nothing to the block's output, so `shrink` can remove it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vl_prune.errors import VLPruneError
from vl_prune.pruning.layout import alive_mask, current_weight
from vl_prune.pruning.methods import BoolMaskPruning, Parameters
from vl_prune.pruning.select import check_amount, count_to_prune, count_true

HEADS, NEURONS = "heads", "neurons"


@dataclass(eq=False)
class Block:
    """`units` heads or neurons across `parts`, each a linear layer sliced along rows (dim 0)
    or columns (dim 1), a unit taking `width` consecutive rows or columns. The last part is the
    block's output side. `owner` (heads) is the attention module whose `num_attention_heads`,
    and `all_head_size` or `head_size` (transformers' names), say how many heads it runs."""

    kind: str
    parts: tuple[tuple[nn.Linear, int], ...]
    units: int
    width: int
    owner: nn.Module | None = None


def heads(
    query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear, owner: nn.Module
) -> Block:
    """The heads of one attention block (`owner.num_attention_heads` of them)."""
    parts = ((query, 0), (key, 0), (value, 0), (output, 1))
    count = owner.num_attention_heads
    return Block(HEADS, parts, count, current_weight(query, "weight").shape[0] // count, owner)


def neurons(inner: nn.Linear, outer: nn.Linear) -> Block:
    """The neurons of one feed-forward block: `inner`'s rows, `outer`'s columns."""
    return Block(NEURONS, ((inner, 0), (outer, 1)), current_weight(inner, "weight").shape[0], 1)


def _per_unit(block: Block, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` (a part's shape) viewed as units × everything else of a unit."""
    if dim == 0:
        return tensor.reshape(block.units, -1)
    return tensor.reshape(tensor.shape[0], block.units, block.width).transpose(0, 1).flatten(1)


def unit_scores(block: Block) -> torch.Tensor:
    """The L1 norm of each unit's weights over all parts, pruned entries counted as zero."""
    total = torch.zeros(block.units, dtype=torch.float64)
    for linear, dim in block.parts:
        weight = current_weight(linear, "weight")
        mask = alive_mask(linear, "weight")
        if mask is not None:
            weight = torch.where(mask, weight, 0.0)
        total += _per_unit(block, weight.abs(), dim).sum(1, dtype=torch.float64).cpu()
    return total


def alive_units(block: Block) -> torch.Tensor:
    """Which units still add to the block's output: those with any weight alive in the output
    part's slice."""
    linear, dim = block.parts[-1]
    mask = alive_mask(linear, "weight")
    if mask is None:
        return torch.ones(block.units, dtype=torch.bool)
    return _per_unit(block, mask, dim).any(1).cpu()


def block_weights(structure: Sequence[Block]) -> int:
    """How many weights the blocks' parts hold: all their heads and neurons together."""
    return sum(current_weight(linear, "weight").numel() for b in structure for linear, _ in b.parts)


class UnitMask(BoolMaskPruning):
    """Keep the rows (`dim` 0) or columns (`dim` 1) marked in `keep`, intersected with the mask
    a tensor has; the hook of every tensor a structured method cuts."""

    PRUNING_TYPE = "structured"

    def __init__(self, keep: torch.Tensor, dim: int):
        self.keep, self.dim = keep.bool(), dim

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor | None) -> torch.Tensor:
        if t.dim() != 2 or t.shape[self.dim] != self.keep.numel():
            raise ValueError(
                f"{self.keep.numel()} {'rows' if self.dim == 0 else 'columns'} to keep do not "
                f"fit a tensor of shape {tuple(t.shape)}"
            )
        shape = (-1, 1) if self.dim == 0 else (1, -1)
        keep = self.keep.to(t.device).view(shape).expand(t.shape).clone()
        return keep if default_mask is None else keep.logical_and_(default_mask.bool())


class StructuredMagnitude(UnitMask):
    """Structured IMP: whole heads and neurons with the lowest L1 norm in the model go.

    Heads are ranked with heads and neurons with neurons, and the same fraction of each is cut.

    Driven by weight counts like the unstructured methods: a group that should lose `amount`
    more weights has fraction f = (pruned + amount) / (weights in heads and neurons) of its
    heads and of its neurons cut, rounded down to whole units: a round never passes its target
    (so the next one's is never behind it, whatever the schedule) and falls short of it by less
    than one head and one neuron. Weights outside every block (the pooler) are never cut."""

    #: the lottery passes `structure=backbone.structure()` to `prune_group`
    needs_structure: ClassVar[bool] = True

    @classmethod
    def prune_group(
        cls,
        parameters: Parameters,
        amount: float | int,
        structure: Sequence[Block] = (),
        **kwargs,
    ) -> None:
        if not structure:
            raise VLPruneError(
                f"{cls.__name__} cuts heads and neurons: the backbone declares none "
                "(Backbone.structure)"
            )
        check_amount(amount)
        parameters = list(parameters)
        masks = [alive_mask(*p) for p in parameters]
        sizes = [current_weight(*p).numel() for p in parameters]
        alive = sum(n if m is None else count_true(m) for n, m in zip(sizes, masks, strict=True))
        target = sum(sizes) - alive + count_to_prune(amount, alive)
        fraction = min(1.0, target / block_weights(structure))
        for kind in (HEADS, NEURONS):
            blocks = [b for b in structure if b.kind == kind]
            for block, keep in zip(blocks, cls.kept_units(blocks, fraction), strict=True):
                rows = keep.repeat_interleave(block.width)
                for linear, dim in block.parts:
                    cls.apply(linear, "weight", keep=rows, dim=dim)

    @classmethod
    def kept_units(cls, blocks: Sequence[Block], fraction: float) -> list[torch.Tensor]:
        """Each block's units to keep, once `fraction` of all their units is cut (ties: the
        earlier unit stays)."""
        if not blocks:
            return []
        scores = torch.cat([unit_scores(b) for b in blocks])
        alive = torch.cat([alive_units(b) for b in blocks])
        goal = math.floor(fraction * alive.numel())
        more = max(0, goal - int((~alive).sum()))
        # Sorted back to front, a stable sort puts the later of two equal units first to go.
        backwards = scores.masked_fill(~alive, math.inf).flip(0)
        order = alive.numel() - 1 - torch.sort(backwards, stable=True).indices
        keep = alive.clone()
        keep[order[:more]] = False
        return list(keep.split([b.units for b in blocks]))


class LayerwiseStructuredMagnitude(StructuredMagnitude):
    """Structured, per block: every block loses the same fraction of its heads or neurons.

    Each block rounds down to whole units on its own, so a round can fall short of its target
    by up to one unit a block."""

    @classmethod
    def kept_units(cls, blocks: Sequence[Block], fraction: float) -> list[torch.Tensor]:
        return [StructuredMagnitude.kept_units([block], fraction)[0] for block in blocks]
