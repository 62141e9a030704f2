"""torch's prune layout, known in one place: where a pruned tensor keeps its values, its mask and
its hook.

`torch.nn.utils.prune` turns a parameter `weight` into a `weight_orig` parameter, a
`weight_mask` buffer and a forward pre-hook that recomputes `weight = weight_orig ⊙ mask`
before each forward. Everything else in vl_prune reads and writes pruned modules through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune.errors import VLPruneError

ORIG, MASK = "_orig", "_mask"


def prune_hook(module: nn.Module, name: str) -> tuple[int | None, prune.BasePruningMethod | None]:
    """The key and the pruning method hooked on `module` for its tensor `name`, or Nones."""
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return key, hook
    return None, None


def replace_hook(module: nn.Module, key: int, method: prune.BasePruningMethod) -> None:
    """Put `method` in the place of the pruning hook under `key` (see `prune_hook`)."""
    module._forward_pre_hooks[key] = method


def alive_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The bool mask of weights still alive, or None if the tensor is not pruned."""
    mask = getattr(module, name + MASK, None)
    return None if mask is None else mask.bool()


def stored_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter that holds the tensor's values, pruned entries included: `<name>_orig`
    where pruned, else `<name>` itself."""
    orig = getattr(module, name + ORIG, None)
    return getattr(module, name) if orig is None else orig


def current_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The weight's values now, pruned entries included, detached.

    `module.<name>` itself is refreshed only by the forward pre-hook, so after an optimizer step
    or a rewind it is stale; the masks keep dead weights out of every selection anyway.
    """
    return stored_parameter(module, name).detach()


def is_parameter(module: nn.Module, name: str) -> bool:
    """Whether `name` is a parameter of `module`, pruned (kept as `<name>_orig`) or not."""
    return name in module._parameters or name + ORIG in module._parameters


def pruned_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, tensor name) pair of `model` that a pruning hook masks."""
    return [
        (module, hook._tensor_name)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]


@contextmanager
def zeros_in_place(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Train `model`'s pruned tensors at the dense model's speed, in torch's layout again after.

    Inside, each pruned `<name>_orig` holds zeros where its mask does and is the tensor its module
    reads, with no hook: torch's hook would build `orig ⊙ mask` anew on every forward and mask the
    gradient through autograd. Yields `mask_gradients`, to call before every optimizer step: it
    zeroes the pruned entries' gradients in place, after any all-reduce, so AdamW (weight decay
    included) leaves a zero weight at zero. Frozen tensors keep their hooks and values. On
    leaving, even by an exception, each module has its hooks back in their order and `<name>`
    recomputed; the pruned entries of `<name>_orig` stay zero, which no masked output can tell.
    """
    pruned: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hooks: dict[nn.Module, dict] = {}
    changed: list[tuple[nn.Module, str]] = []
    try:
        for module, name in pruned_parameters(model):
            orig, mask = getattr(module, name + ORIG), getattr(module, name + MASK)
            if not orig.requires_grad:
                continue  # frozen (under LoRA adapters, say): its hook costs no backward
            hooks.setdefault(module, dict(module._forward_pre_hooks))
            key, _ = prune_hook(module, name)
            del module._forward_pre_hooks[key]
            with torch.no_grad():
                orig.mul_(mask)
            # Where the hook keeps `<name>`: the module's plain attributes, not a parameter.
            module.__dict__[name] = orig
            changed.append((module, name))
            # torch's own masks are float: `where` wants a bool one
            pruned.append((orig, mask.bool(), orig.new_zeros(())))

        def mask_gradients() -> None:
            for orig, alive, zero in pruned:
                if orig.grad is not None:
                    # `where` reads a bool mask twice as fast as a multiply, which casts it
                    torch.where(alive, orig.grad, zero, out=orig.grad)

        yield mask_gradients
    finally:
        for module, saved in hooks.items():
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(saved)
        for module, name in changed:
            refresh(module, name)


def refresh(module: nn.Module, name: str) -> None:
    """Recompute the masked tensor now rather than at the next forward, so nothing reads a
    stale one."""
    _, hook = prune_hook(module, name)
    if hook is not None:
        setattr(module, name, hook.apply_mask(module))


def plain_name(key: str) -> str:
    """A state-dict key under the name the tensor has unpruned (`…weight_orig` → `…weight`)."""
    return key.removesuffix(ORIG)


def baked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their plain names, pruned entries zero: what `prune.remove`
    would leave, without touching `model`."""
    tensors = model.state_dict()
    state = {}
    for key, value in tensors.items():
        if key.endswith(MASK):
            continue
        plain = plain_name(key)
        if key.endswith(ORIG):
            value = torch.where(tensors[plain + MASK].bool(), value, 0.0)
        state[plain] = value.detach().cpu().contiguous()
    return state


def load_plain_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` (plain names, or the model's own) into `model`, whose pruned tensors keep
    their values under `<name>_orig` and their masks untouched; every tensor must be given."""
    for key, target in model.state_dict().items():
        if key.endswith(MASK):
            continue
        plain = plain_name(key)
        value = state.get(plain, state.get(key))
        if value is None:
            raise VLPruneError(f"weights file has no tensor {plain!r}")
        if value.shape != target.shape:
            raise VLPruneError(
                f"tensor {plain!r} has shape {tuple(value.shape)}, the model's "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value)
