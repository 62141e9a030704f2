import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from vl_prune.pruning import (
    GlobalMagnitude,
    GlobalRandom,
    KeepMask,
    LayerwiseMagnitude,
    alive_mask,
    count_pruned,
    geometric,
    linear,
    prune_to,
)

METHODS = [GlobalMagnitude, LayerwiseMagnitude, GlobalRandom]
# Mixed ranks and sizes, including a single-element tensor.
SHAPES = [(7,), (5, 9), (1,), (3, 4, 6), (40, 13)]


class Holder(nn.Module):
    """Owns one parameter `weight` of any shape; calling it runs the pruning pre-hook."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)

    def forward(self) -> torch.Tensor:
        return self.weight


def make_group(shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(Holder(torch.randn(s, generator=generator)), "weight") for s in shapes]


def copy_group(params):
    return [(copy.deepcopy(module), name) for module, name in params]


def alive(params):
    """A copy of every tensor's bool alive mask (all True where it is not pruned yet)."""
    masks = []
    for module, name in params:
        mask = alive_mask(module, name)
        if mask is None:
            mask = torch.ones_like(getattr(module, name), dtype=torch.bool)
        masks.append(mask.clone())
    return masks


def n_alive(params) -> int:
    return sum(int(mask.sum()) for mask in alive(params))


def n_total(params) -> int:
    return sum(getattr(module, name).numel() for module, name in params)


def original(module, name="weight"):
    return getattr(module, name + "_orig", getattr(module, name)).detach()


def to_count(amount, alive_count: int) -> int:
    if amount == "all":
        return alive_count
    return amount if isinstance(amount, int) else round(amount * alive_count)


def resolve(amount, alive_count: int):
    return alive_count if amount == "all" else amount


def torch_global(params, amount, importance_scores=None):
    prune.global_unstructured(
        params,
        pruning_method=prune.L1Unstructured,
        amount=amount,
        importance_scores=importance_scores,
    )


def pruning_hooks(module):
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def assert_masks_equal(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def assert_smallest_pruned(values, before, after):
    """Among the weights alive `before`, the ones pruned now are no larger than the survivors."""
    newly = before & ~after
    if newly.any() and after.any():
        assert values[newly].abs().max() <= values[after].abs().min()


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def linear_weights(model):
    return [(m, "weight") for m in model if isinstance(m, nn.Linear)]


# 1. Global magnitude selects what torch's global_unstructured selects.

AMOUNTS = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0, 0, 1, 17, "all"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("amount", AMOUNTS)
def test_global_magnitude_selects_like_torch_global_unstructured(amount, seed):
    ours = make_group(seed=seed)
    theirs = copy_group(ours)
    amount = resolve(amount, n_total(ours))

    GlobalMagnitude.prune_group(ours, amount)
    torch_global(theirs, amount)

    assert_masks_equal(alive(ours), alive(theirs))
    assert count_pruned(ours) == to_count(amount, n_total(ours))


@pytest.mark.parametrize(
    "first, second",
    [(0.5, 0.5), (0.37, 17), (100, 0.9), (0.2, "all"), (0.9, 1.0), (1, 0.1), (0.5, 0)],
)
def test_repeated_global_magnitude_selects_like_repeated_torch(first, second):
    ours = make_group(seed=3)
    theirs = copy_group(ours)

    GlobalMagnitude.prune_group(ours, first)
    torch_global(theirs, first)
    alive_after_first = n_alive(ours)
    second = resolve(second, alive_after_first)
    GlobalMagnitude.prune_group(ours, second)
    torch_global(theirs, second)

    assert_masks_equal(alive(ours), alive(theirs))
    assert n_alive(ours) == alive_after_first - to_count(second, alive_after_first)


def test_global_magnitude_selects_like_torch_on_non_contiguous_weights():
    ours = [
        (Holder(torch.randn(9, 5).t()), "weight"),
        (Holder(torch.randn(4, 3, 2)[:, 1]), "weight"),
    ]
    assert not any(m.weight.is_contiguous() for m, _ in ours)
    # torch's global_unstructured cannot take non-contiguous weights: compare to contiguous copies.
    theirs = [(Holder(m.weight.detach().contiguous()), n) for m, n in ours]
    GlobalMagnitude.prune_group(ours, 0.4)
    torch_global(theirs, 0.4)
    assert_masks_equal(alive(ours), alive(theirs))


# 2. A pruned module looks exactly as torch's prune API leaves it.


def test_pruned_module_looks_as_torch_leaves_it():
    model = small_mlp()
    GlobalMagnitude.prune_group(linear_weights(model), 0.4)

    assert prune.is_pruned(model)
    for module, _ in linear_weights(model):
        assert module.weight_mask.dtype == torch.bool
        assert isinstance(module.weight_orig, nn.Parameter)
        assert "weight_orig" in dict(module.named_parameters())
        assert "weight" not in module._parameters
        assert "weight_mask" in dict(module.named_buffers())
        assert len(pruning_hooks(module)) == 1
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


def test_forward_uses_masked_weight_recomputed_from_weight_orig():
    model = small_mlp()
    GlobalMagnitude.prune_group(linear_weights(model), 0.5)
    first = model[0]
    with torch.no_grad():
        first.weight_orig.add_(100.0)  # Changes every weight, including the pruned ones.
    x = torch.randn(4, 8)

    out = first(x)

    expected = F.linear(x, first.weight_orig * first.weight_mask, first.bias)
    assert torch.allclose(out, expected)
    assert torch.all(first.weight[~first.weight_mask] == 0)


def test_prune_remove_bakes_mask_in():
    model = small_mlp()
    GlobalMagnitude.prune_group(linear_weights(model), 0.4)
    expected = [(m.weight_orig * m.weight_mask).detach().clone() for m, _ in linear_weights(model)]
    masks = alive(linear_weights(model))

    for module, name in linear_weights(model):
        prune.remove(module, name)

    assert not prune.is_pruned(model)
    for (module, _), weight, mask in zip(linear_weights(model), expected, masks, strict=True):
        assert isinstance(module.weight, nn.Parameter)
        assert torch.equal(module.weight.detach(), weight)
        assert torch.all(module.weight[~mask] == 0)
        assert not hasattr(module, "weight_orig")
        assert not hasattr(module, "weight_mask")
        assert not pruning_hooks(module)


@pytest.mark.parametrize("method", METHODS)
def test_torch_method_chained_on_top_prunes_only_among_alive_weights(method):
    model = small_mlp()
    method.prune_group(linear_weights(model), 0.4)
    module = model[0]
    before = alive_mask(module, "weight").clone()

    prune.l1_unstructured(module, "weight", amount=0.2)

    after = alive_mask(module, "weight")
    assert int(before.sum() - after.sum()) == round(0.2 * int(before.sum()))
    assert torch.all(before | ~after)  # Pruned stays pruned.
    assert_smallest_pruned(module.weight_orig.detach(), before, after)
    assert torch.equal(module.weight, module.weight_orig * module.weight_mask)
    assert len(pruning_hooks(module)) == 1
    module(torch.randn(2, 8))


@pytest.mark.parametrize("method", METHODS)
def test_repruning_updates_the_bool_mask_in_place_with_a_single_hook(method):
    model = small_mlp()
    params = linear_weights(model)
    method.prune_group(params, 0.3)
    masks = [module.weight_mask for module, _ in params]
    pointers = [mask.data_ptr() for mask in masks]

    method.prune_group(params, 0.3)

    for (module, _), mask, pointer in zip(params, masks, pointers, strict=True):
        assert module.weight_mask is mask
        assert module.weight_mask.data_ptr() == pointer
        assert module.weight_mask.dtype == torch.bool
        hooks = pruning_hooks(module)
        assert len(hooks) == 1
        assert isinstance(hooks[0], method)
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


# 3. The hook keeps no copy of the mask.


@pytest.mark.parametrize("method", [*METHODS, KeepMask])
def test_hook_holds_no_tensor(method):
    params = make_group()
    for _ in range(2):
        if method is KeepMask:
            for module, name in params:
                KeepMask.apply(module, name, importance_scores=torch.rand_like(module.weight) > 0.3)
        else:
            method.prune_group(params, 0.3)
        for module, _ in params:
            (hook,) = pruning_hooks(module)
            assert not [k for k, v in vars(hook).items() if isinstance(v, torch.Tensor)]


# 4. Repeated pruning removes only alive weights, even after rewinding.


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("second", [0.3, 50, "all"])
@pytest.mark.parametrize("forward_after_rewind", [False, True])
def test_repruning_after_rewind_removes_only_alive_weights(method, second, forward_after_rewind):
    params = make_group(seed=5)
    method.prune_group(params, 0.4)
    first = alive(params)
    alive_count = n_alive(params)
    assert count_pruned(params) == round(0.4 * n_total(params))

    # Rewind: big values everywhere in weight_orig, pruned positions included.
    for module, _ in params:
        module.weight_orig.data.copy_(1e3 + torch.rand_like(module.weight_orig))
        if forward_after_rewind:
            module()
    second = resolve(second, alive_count)
    method.prune_group(params, second)

    for before, after in zip(first, alive(params), strict=True):
        assert torch.all(before | ~after)
    assert n_alive(params) == alive_count - to_count(second, alive_count)


@pytest.mark.parametrize("method", [GlobalMagnitude, LayerwiseMagnitude])
def test_magnitudes_come_from_weight_orig_even_without_a_forward(method):
    # After an optimizer step or a rewind, `module.weight` is stale until the next forward.
    stale, fresh = make_group(seed=6), make_group(seed=6)
    for params, run_forward in ((stale, False), (fresh, True)):
        method.prune_group(params, 0.3)
        generator = torch.Generator().manual_seed(7)
        for module, _ in params:
            shape = module.weight_orig.shape
            module.weight_orig.data.copy_(torch.randn(shape, generator=generator))
            if run_forward:
                module()  # Refreshes `module.weight` from weight_orig.
        method.prune_group(params, 0.4)

    assert_masks_equal(alive(stale), alive(fresh))


# 5. importance_scores are honoured.


def test_global_magnitude_follows_importance_scores_not_weights():
    ours = make_group(seed=7)
    theirs = copy_group(ours)
    generator = torch.Generator().manual_seed(8)
    scores = [torch.randn(m.weight.shape, generator=generator) for m, _ in ours]

    GlobalMagnitude.prune_group(ours, 0.5, importance_scores=dict(zip(ours, scores, strict=True)))
    torch_global(theirs, 0.5, importance_scores=dict(zip(theirs, scores, strict=True)))

    assert_masks_equal(alive(ours), alive(theirs))
    by_weight = make_group(seed=7)
    GlobalMagnitude.prune_group(by_weight, 0.5)
    assert any(not torch.equal(a, b) for a, b in zip(alive(ours), alive(by_weight), strict=True))


@pytest.mark.parametrize("method", [GlobalMagnitude, LayerwiseMagnitude])
@pytest.mark.parametrize("dead_score", [0.0, 1e-6, 1e6, "random"])
def test_importance_scores_on_repruning_ignore_dead_weights(method, dead_score):
    params = make_group(seed=9)
    method.prune_group(params, 0.5)
    first = alive(params)
    alive_count = n_alive(params)
    # Whatever the scores say at dead positions, dead weights are neither revived nor counted.
    scores = {}
    for (m, n), mask in zip(params, first, strict=True):
        dead = (
            torch.rand(mask.shape) if dead_score == "random" else torch.full(mask.shape, dead_score)
        )
        scores[m, n] = torch.where(mask, torch.rand(mask.shape) + 0.5, dead)

    method.prune_group(params, 0.5, importance_scores=scores)

    assert n_alive(params) == alive_count - round(0.5 * alive_count)
    for (m, n), before, after in zip(params, first, alive(params), strict=True):
        assert torch.all(before | ~after)
        if method is LayerwiseMagnitude:
            assert_smallest_pruned(scores[m, n], before, after)
    if method is GlobalMagnitude:
        values = torch.cat([scores[p].reshape(-1) for p in params])
        before = torch.cat([mask.reshape(-1) for mask in first])
        after = torch.cat([mask.reshape(-1) for mask in alive(params)])
        assert_smallest_pruned(values, before, after)


@pytest.mark.parametrize("method", [GlobalMagnitude, LayerwiseMagnitude])
def test_importance_scores_with_wrong_shape_are_rejected(method):
    params = make_group()
    method.prune_group(params, 0.2)
    module, name = params[1]
    with pytest.raises((ValueError, AssertionError)):
        method.apply(module, name, amount=0.1, importance_scores=torch.rand(3))


# 6. Layer-wise magnitude.


@pytest.mark.parametrize("amount", [0.3, 0.75, 50, 1.0])
def test_layerwise_prunes_the_same_fraction_of_each_tensor_and_exact_total(amount):
    params = make_group(seed=11)
    GlobalMagnitude.prune_group(params, 0.5)  # Tensors now have different alive fractions.
    before = alive(params)
    alive_count = n_alive(params)
    k = to_count(amount, alive_count)

    LayerwiseMagnitude.prune_group(params, amount)

    after = alive(params)
    assert n_alive(params) == alive_count - k
    for (module, _), b, a in zip(params, before, after, strict=True):
        lost = int(b.sum() - a.sum())
        assert abs(lost - k / alive_count * int(b.sum())) < 1
        assert torch.all(b | ~a)
        assert_smallest_pruned(module.weight_orig.detach(), b, a)


# 7. Global random.


@pytest.mark.parametrize("amount", [0.3, 123])
def test_global_random_prunes_exactly_among_alive(amount):
    params = make_group(seed=12)
    GlobalRandom.prune_group(params, 0.4, seed=1)
    before = alive(params)
    alive_count = n_alive(params)

    GlobalRandom.prune_group(params, amount, seed=2)

    assert n_alive(params) == alive_count - to_count(amount, alive_count)
    for b, a in zip(before, alive(params), strict=True):
        assert torch.all(b | ~a)


def test_global_random_same_seed_same_masks_different_seed_different_masks():
    base = make_group()
    groups = {name: copy_group(base) for name in ("a", "b", "c")}
    for name, seed in (("a", 42), ("b", 42), ("c", 43)):
        GlobalRandom.prune_group(groups[name], 0.5, seed=seed)
        GlobalRandom.prune_group(groups[name], 0.5, seed=seed)

    assert_masks_equal(alive(groups["a"]), alive(groups["b"]))
    assert any(
        not torch.equal(a, c) for a, c in zip(alive(groups["a"]), alive(groups["c"]), strict=True)
    )


def test_global_random_without_seed_differs_between_calls():
    first, second = make_group(), make_group()
    GlobalRandom.prune_group(first, 0.5)
    GlobalRandom.prune_group(second, 0.5)
    assert any(not torch.equal(a, b) for a, b in zip(alive(first), alive(second), strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_random_is_roughly_uniform_across_and_within_tensors(seed):
    # Magnitudes grow with the index, so a magnitude bias would show up as a positional one.
    small = Holder(torch.linspace(0.01, 1, 1000))
    large = Holder(torch.linspace(0.01, 1, 3000))
    params = [(small, "weight"), (large, "weight")]

    GlobalRandom.prune_group(params, 2000, seed=seed)

    pruned_small, pruned_large = (int((~m).sum()) for m in alive(params))
    assert pruned_small + pruned_large == 2000
    assert abs(pruned_small - 500) < 100  # The standard deviation is about 14.
    dead_large = ~alive_mask(large, "weight")
    assert abs(int(dead_large[:1500].sum()) - int(dead_large[1500:].sum())) < 200


# 8. Single-tensor apply, like torch's methods.


@pytest.mark.parametrize("amount", [0.3, 0.0, 1.0, 7])
def test_apply_on_one_tensor_matches_torch_l1_unstructured(amount):
    ours = small_mlp()[0]
    theirs = copy.deepcopy(ours)

    GlobalMagnitude.apply(ours, "weight", amount=amount)
    prune.l1_unstructured(theirs, "weight", amount=amount)

    assert ours.weight_mask.dtype == torch.bool
    assert torch.equal(ours.weight_mask, theirs.weight_mask.bool())
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("method", [LayerwiseMagnitude, GlobalRandom])
def test_apply_on_one_tensor_prunes_exactly_the_amount(method):
    module = small_mlp()[0]
    method.apply(module, "weight", amount=0.3)
    method.apply(module, "weight", amount=5)
    assert count_pruned([(module, "weight")]) == round(0.3 * 48) + 5


def test_keep_mask_keeps_exactly_the_given_mask():
    module = small_mlp()[0]
    keep = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.4

    KeepMask.apply(module, "weight", importance_scores=keep)

    assert module.weight_mask.dtype == torch.bool
    assert torch.equal(module.weight_mask, keep)
    assert torch.equal(module.weight, module.weight_orig * keep)


def test_keep_mask_on_a_pruned_tensor_never_revives_weights():
    module = small_mlp()[0]
    GlobalMagnitude.apply(module, "weight", amount=0.5)
    before = module.weight_mask.clone()
    keep = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.4

    KeepMask.apply(module, "weight", importance_scores=keep)

    assert torch.equal(module.weight_mask, before & keep)


# 9. Ties.


def tied_group(seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in [(30,), (8, 9), (5, 5, 2)]:
        magnitude = torch.randint(1, 4, shape, generator=generator).float()
        sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        tensors.append(magnitude * sign)
    return [(Holder(t), "weight") for t in tensors]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("amount", [0.1, 0.5, 0.77, 41])
def test_ties_still_prune_exactly_the_amount_and_the_smallest(method, amount):
    params = tied_group()
    total = n_total(params)

    method.prune_group(params, amount)
    after_first = n_alive(params)
    assert after_first == total - to_count(amount, total)
    method.prune_group(params, 0.5)

    assert n_alive(params) == after_first - round(0.5 * after_first)
    if method is GlobalMagnitude:
        values = torch.cat([original(m).reshape(-1) for m, _ in params])
        masks = torch.cat([mask.reshape(-1) for mask in alive(params)])
        assert_smallest_pruned(values, torch.ones_like(masks), masks)


@pytest.mark.parametrize("amount", [0.25, 0.5, 13])
def test_apply_with_ties_prunes_exactly_the_amount(amount):
    (module, name), *_ = tied_group(seed=1)
    GlobalMagnitude.apply(module, name, amount=amount)
    assert count_pruned([(module, name)]) == to_count(amount, 30)
    assert_smallest_pruned(
        module.weight_orig.detach(), torch.ones(30, dtype=bool), module.weight_mask
    )


@pytest.mark.parametrize("zeros_first", [True, False])
def test_global_magnitude_counts_exactly_when_alive_weights_are_exactly_zero(zeros_first):
    # Exact zeros that are alive (zero-initialised weights, a ticket baked in by prune.remove)
    # tie with the dead weights of another tensor.
    zeros = (Holder(torch.zeros(4)), "weight")
    other = (Holder(torch.arange(1.0, 7.0)), "weight")
    GlobalMagnitude.prune_group([other], 2)
    params = [zeros, other] if zeros_first else [other, zeros]

    GlobalMagnitude.prune_group(params, 1)

    assert count_pruned(params) == 3
    assert count_pruned([other]) == 2


# 10. Schedules and prune_to.


@pytest.mark.parametrize("total", [10, 15, 97, 645, 12345])
def test_linear_schedule_targets_what_torch_fractions_would_prune(total):
    assert linear(total, final=0.9) == [round(i / 10 * total) for i in range(1, 10)]


@pytest.mark.parametrize(
    "total, rate, final", [(1000, 0.2, 0.9), (645, 0.5, 0.99), (10, 0.1, 0.5), (7, 0.05, 0.9)]
)
def test_geometric_schedule_prunes_rate_of_remaining_each_round(total, rate, final):
    targets = geometric(total, rate, final)

    assert targets[-1] == round(final * total)
    previous = [0, *targets[:-1]]
    assert all(b > a for a, b in zip(previous, targets, strict=True))
    for before, after in zip(previous[:-1], targets[:-1], strict=True):
        assert after - before == max(1, round(rate * (total - before)))
    assert targets[-1] - previous[-1] <= max(1, round(rate * (total - previous[-1])))


@pytest.mark.parametrize("final", [0.0, 1.0, -0.1, 1.5])
def test_schedules_reject_final_outside_open_unit_interval(final):
    with pytest.raises(ValueError):
        linear(100, final=final)
    with pytest.raises(ValueError):
        geometric(100, 0.2, final=final)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.2, 1.5])
def test_geometric_rejects_rate_outside_open_unit_interval(rate):
    with pytest.raises(ValueError):
        geometric(100, rate, final=0.9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("schedule", ["linear", "geometric"])
def test_prune_to_reaches_every_schedule_target_exactly(method, schedule):
    params = make_group(seed=13)
    total = n_total(params)
    targets = linear(total) if schedule == "linear" else geometric(total, 0.3, 0.95)
    previous = alive(params)

    for target in targets:
        prune_to(params, method, target)
        assert count_pruned(params) == target
        current = alive(params)
        assert all(torch.all(b | ~a) for b, a in zip(previous, current, strict=True))
        previous = current

    prune_to(params, method, targets[-1])  # Already there: nothing changes.
    assert count_pruned(params) == targets[-1]
    with pytest.raises(ValueError):
        prune_to(params, method, targets[-1] - 1)
    assert count_pruned(params) == targets[-1]


# 11. Bad amounts are rejected as torch rejects them, and leave the model untouched.

BAD_AMOUNTS = [
    (-1, ValueError),
    (-0.1, ValueError),
    (1.5, ValueError),
    (float("nan"), ValueError),
    ("too_many", ValueError),
    (True, TypeError),
    ("0.5", TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize("amount, error", BAD_AMOUNTS)
def test_torch_rejects_the_same_bad_amounts(amount, error):
    module = small_mlp()[0]
    with pytest.raises(error):
        prune.l1_unstructured(module, "weight", amount=49 if amount == "too_many" else amount)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("amount, error", BAD_AMOUNTS)
def test_bad_amounts_are_rejected_by_prune_group_and_apply(method, amount, error):
    params = make_group()
    module, name = params[1]
    with pytest.raises(error):
        method.prune_group(params, n_total(params) + 1 if amount == "too_many" else amount)
    with pytest.raises(error):
        method.apply(
            module, name, amount=module.weight.numel() + 1 if amount == "too_many" else amount
        )
    assert not any(prune.is_pruned(m) for m, _ in params)


@pytest.mark.parametrize("method", METHODS)
def test_int_amount_above_the_alive_count_is_rejected_after_pruning(method):
    params = make_group()
    method.prune_group(params, 0.5)
    before = alive(params)
    module, name = params[1]

    with pytest.raises(ValueError):
        method.prune_group(params, n_alive(params) + 1)
    with pytest.raises(ValueError):
        method.apply(module, name, amount=int(alive_mask(module, name).sum()) + 1)

    assert_masks_equal(alive(params), before)


# 12. Half-precision weights.

HALF_SHAPES = [(7,), (5, 9), (1,), (3, 4, 6)]  # 125 weights: integers up to 256 are exact in bf16.


def distinct_half_group(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = sum(torch.Size(s).numel() for s in HALF_SHAPES)
    sign = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    values = ((torch.randperm(n, generator=generator) + 1).float() * sign).to(dtype)
    chunks = values.split([torch.Size(s).numel() for s in HALF_SHAPES])
    return [(Holder(c.reshape(s)), "weight") for c, s in zip(chunks, HALF_SHAPES, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_global_magnitude_matches_torch_in_float32(dtype):
    ours = distinct_half_group(dtype)
    theirs = [(Holder(m.weight.detach().float()), n) for m, n in ours]

    for amount in (0.3, 20):
        GlobalMagnitude.prune_group(ours, amount)
        torch_global(theirs, amount)
        assert_masks_equal(alive(ours), alive(theirs))

    for module, name in ours:
        assert module.weight_mask.dtype == torch.bool
        assert module.weight_orig.dtype == dtype
        assert module().dtype == dtype
        prune.remove(module, name)
        assert module.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", [LayerwiseMagnitude, GlobalRandom])
def test_half_precision_other_methods_prune_exactly(dtype, method):
    params = distinct_half_group(dtype, seed=1)
    method.prune_group(params, 0.4)
    method.prune_group(params, 11)
    assert count_pruned(params) == round(0.4 * 125) + 11
    assert all(m.weight_mask.dtype == torch.bool for m, _ in params)


def test_linear_schedule_skips_rounds_that_would_prune_nothing():
    from vl_prune.pruning import linear

    targets = linear(5)
    assert targets == sorted(set(targets)) and targets[0] > 0 and targets[-1] == round(0.9 * 5)
