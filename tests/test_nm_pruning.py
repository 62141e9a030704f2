"""N:M semi-structured pruning (2:4 by default): the mask pattern sparse tensor cores run, in
torch's prune layout."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune import registry
from vl_prune.pruning import GlobalMagnitude, NMMagnitude


def layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(16, 8)


def test_two_of_every_four_largest_stay():
    linear = layer()
    before = linear.weight.detach().clone()
    NMMagnitude.apply(linear, "weight")
    mask = linear.weight_mask
    assert mask.dtype == torch.bool and prune.is_pruned(linear)
    groups = mask.reshape(-1, 4)
    assert (groups.sum(dim=1) == 2).all()  # exactly 2:4, so exactly 50%
    magnitudes = before.abs().reshape(-1, 4)
    kept = magnitudes[groups].reshape(-1, 2)
    dropped = magnitudes[~groups].reshape(-1, 2)
    assert (kept.min(dim=1).values >= dropped.max(dim=1).values).all()
    assert torch.equal(linear.weight, before * mask)
    assert torch.equal(linear.weight_orig, before)


def test_other_patterns_and_ties():
    linear = layer()
    NMMagnitude.apply(linear, "weight", n=1, m=8)
    assert (linear.weight_mask.reshape(-1, 8).sum(dim=1) == 1).all()
    tied = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        tied.weight.fill_(1.0)
    NMMagnitude.apply(tied, "weight")
    assert tied.weight_mask.tolist() == [[True, True, False, False]]  # the earlier ones stay


def test_weights_pruned_before_stay_pruned():
    linear = layer()
    GlobalMagnitude.prune_group([(linear, "weight")], 0.6)
    earlier = linear.weight_mask.clone()
    NMMagnitude.apply(linear, "weight")
    mask = linear.weight_mask
    assert not mask[~earlier].any()
    assert (mask.reshape(-1, 4).sum(dim=1) <= 2).all()
    # a group keeps its two largest survivors where it has them
    survivors = earlier.reshape(-1, 4).sum(dim=1).clamp(max=2)
    assert torch.equal(mask.reshape(-1, 4).sum(dim=1), survivors)


def test_shapes_it_cannot_cut_are_refused_untouched():
    odd = nn.Linear(6, 3)
    with pytest.raises(ValueError, match=r"multiple of 4 weights, not a tensor of shape \(3, 6\)"):
        NMMagnitude.apply(odd, "weight")
    assert not prune.is_pruned(odd)
    with pytest.raises(ValueError, match="0 < N < M"):
        NMMagnitude(n=4, m=4)


def test_it_is_registered_and_prunes_a_group():
    assert registry.load("methods", "nm") is NMMagnitude
    first, second = layer(1), layer(2)
    NMMagnitude.prune_group([(first, "weight"), (second, "weight")])
    for linear in (first, second):
        assert (linear.weight_mask.reshape(-1, 4).sum(dim=1) == 2).all()
