"""Pruned tensors train as zeros held in place (`zeros_in_place`), as fit does: the same weights
as torch's hook path, and torch's prune layout again afterwards."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune.pruning import GlobalMagnitude, prune_to
from vl_prune.pruning.layout import pruned_parameters, zeros_in_place


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _pruned_by_vl_prune() -> nn.Module:
    model = _model()
    weights = [(model[0], "weight"), (model[2], "weight"), (model[2], "bias")]
    prune_to(weights, GlobalMagnitude, 100)
    return model


def _pruned_by_torch() -> nn.Module:
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    return model


def _train(model: nn.Module, steps: int, in_place: bool) -> None:
    """AdamW with weight decay on a fixed regression problem."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(steps, 32, 8, generator=generator)
    targets = torch.randn(steps, 32, 4, generator=generator)

    def step(i: int, mask_gradients=lambda: None) -> None:
        loss = nn.functional.mse_loss(model(inputs[i]), targets[i])
        loss.backward()
        mask_gradients()
        optimizer.step()
        optimizer.zero_grad()

    if in_place:
        with zeros_in_place(model) as mask_gradients:
            for i in range(steps):
                step(i, mask_gradients)
    else:
        for i in range(steps):
            step(i)


@pytest.mark.parametrize("pruned", [_pruned_by_vl_prune, _pruned_by_torch])
def test_training_in_place_gives_the_hook_paths_weights_and_layout(pruned):
    hooked, in_place = pruned(), pruned()
    _train(hooked, 8, in_place=False)
    _train(in_place, 8, in_place=True)

    probe = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(in_place(probe), hooked(probe), rtol=1e-5, atol=1e-6)
    for (module, name), (reference, _) in zip(
        pruned_parameters(in_place), pruned_parameters(hooked), strict=True
    ):
        orig, mask = getattr(module, name + "_orig"), getattr(module, name + "_mask").bool()
        expected = getattr(reference, name + "_orig")
        torch.testing.assert_close(orig[mask], expected[mask], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(orig[~mask]) == 0  # held at exactly zero
        # torch's layout again: parameter, buffer, hook and the masked tensor
        assert name + "_orig" in module._parameters and name not in module._parameters
        assert name + "_mask" in module._buffers
        hooks = module._forward_pre_hooks.values()
        assert any(isinstance(hook, prune.BasePruningMethod) for hook in hooks)
        torch.testing.assert_close(getattr(module, name), orig * mask)


def test_the_layout_comes_back_when_training_fails():
    model = _pruned_by_vl_prune()
    before = {id(m): list(m._forward_pre_hooks.items()) for m in model.modules()}
    reference = _pruned_by_vl_prune()
    with pytest.raises(RuntimeError, match="stopped"), zeros_in_place(model):
        assert model[0].weight is model[0].weight_orig  # read as the parameter itself
        raise RuntimeError("stopped")
    assert {id(m): list(m._forward_pre_hooks.items()) for m in model.modules()} == before
    assert model[0].weight is not model[0].weight_orig
    probe = torch.randn(3, 8)
    torch.testing.assert_close(model(probe), reference(probe))
