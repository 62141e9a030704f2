"""Pruning methods on torch.nn.utils.prune that keep one bool mask per tensor.

torch's own methods store the mask in the weight's dtype (4 bytes per fp32 weight) and
`CustomFromMask` keeps a second copy on the hook (pytorch#34257). These methods store a
`torch.bool` mask and only scalars on the hook, and otherwise leave a module exactly as torch's
API does: a `<name>_orig` parameter, a `<name>_mask` buffer and a forward pre-hook, so
`prune.is_pruned`, `prune.remove` and chaining a torch method on top all work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune.pruning.layout import (
    MASK,
    ORIG,
    alive_mask,
    current_weight,
    prune_hook,
    replace_hook,
)
from vl_prune.pruning.select import (
    check_amount,
    count_to_prune,
    count_true,
    key_value,
    split_smallest,
)

Parameters = Sequence[tuple[nn.Module, str]]
Scores = Mapping[tuple[nn.Module, str], torch.Tensor]


class BoolMaskPruning(prune.BasePruningMethod):
    """Shared machinery: bool masks, and re-pruning in place among the weights still alive.

    The module ends up as torch's `apply` leaves it (`<name>_orig` parameter, `<name>_mask`
    buffer, the method as forward pre-hook), but the mask is computed before the module is
    touched, so a failure changes nothing, and from a bool all-alive mask rather than torch's
    float `ones_like`. Pruning again updates the mask in place and replaces the hook, where
    torch would wrap both methods in a `PruningContainer` and widen the mask to the weight's
    dtype. On top of a torch method, torch's own path is taken unchanged.
    """

    PRUNING_TYPE = "unstructured"

    @classmethod
    def apply(cls, module, name, *args, importance_scores=None, **kwargs):
        key, old = prune_hook(module, name)
        if old is not None and not isinstance(old, BoolMaskPruning):
            return super().apply(module, name, *args, importance_scores=importance_scores, **kwargs)
        weight = getattr(module, name)
        scores = current_weight(module, name) if importance_scores is None else importance_scores
        if scores.shape != weight.shape:
            raise ValueError(
                f"importance_scores of shape {tuple(scores.shape)} do not fit "
                f"{name} of shape {tuple(weight.shape)}"
            )
        method = cls(*args, **kwargs)
        method._tensor_name = name
        if old is None:
            mask = method.compute_mask(scores, default_mask=None)
            module.register_parameter(name + ORIG, weight)
            del module._parameters[name]
            module.register_buffer(name + MASK, mask)
            setattr(module, name, method.apply_mask(module))
            module.register_forward_pre_hook(method)
        else:
            mask = getattr(module, name + MASK)
            mask.copy_(method.compute_mask(scores, default_mask=mask))
            setattr(module, name, method.apply_mask(module))
            replace_hook(module, key, method)
        return method

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        """`<name>_orig` with the pruned entries zeroed, as torch's `mask * orig`, but selected:
        torch widens the mask to the weight's dtype on every forward and keeps that copy alive
        until backward (4 bytes a weight); `where` reads the bool buffer and saves only it."""
        mask = getattr(module, self._tensor_name + MASK)
        orig = getattr(module, self._tensor_name + ORIG)
        return torch.where(mask.bool(), orig, 0.0)  # bool() is free on a bool mask


class KeepMask(BoolMaskPruning):
    """Keep exactly the weights marked True in `importance_scores` (e.g. a ticket's mask)."""

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor | None) -> torch.Tensor:
        keep = t.to(torch.bool, copy=True)
        return keep if default_mask is None else keep.logical_and_(default_mask.bool())


class ScorePruning(BoolMaskPruning):
    """Prune exactly `amount` of the alive weights, lowest |score| first.

    The scores are torch's: `importance_scores` if given, else the (masked) weight. `amount`
    follows torch too: a float is a fraction of the alive weights, an int a count. Ties are
    broken by index. `threshold` is an optional hint (the score key of the last weight to prune)
    that lets group pruning skip the per-tensor selection it has already done. Subclasses
    decide how a group's amount is shared out among its tensors (`split`).
    """

    def __init__(self, amount: float | int, threshold: int | None = None):
        check_amount(amount)
        self.amount = amount
        self.threshold = threshold

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor | None) -> torch.Tensor:
        """The new mask; `default_mask` None (a first pruning, from `apply`) means all alive."""
        alive = None if default_mask is None else default_mask.bool().reshape(-1)
        k = count_to_prune(self.amount, t.numel() if alive is None else count_true(alive))
        if k == 0:
            return torch.ones_like(t, dtype=torch.bool) if alive is None else alive.view(t.shape)
        threshold = self.threshold
        if threshold is None:
            threshold, _ = split_smallest([t], k, [alive])
        # |t| < τ compared on the floats themselves: no full-size key tensor to allocate.
        bound = key_value(threshold)
        flat = t.detach().float().reshape(-1)  # the keys were made from float32 values
        doomed = torch.lt(flat, bound).logical_and_(torch.gt(flat, -bound))
        if alive is not None:
            doomed.logical_and_(alive)
        ties = k - count_true(doomed)
        if ties > 0:
            tied = flat.abs() == bound
            if alive is not None:
                tied.logical_and_(alive)
            doomed[tied.nonzero().squeeze(1)[:ties]] = True
        keep = doomed.logical_not_() if alive is None else doomed.logical_xor_(alive)
        return keep.view(t.shape)

    @classmethod
    def split(cls, parameters: Parameters, scores: Scores, alive: Sequence[int], k: int, **kwargs):
        """Constructor arguments for each tensor so that the group loses exactly k alive weights."""
        raise NotImplementedError

    @classmethod
    def prune_group(
        cls,
        parameters: Parameters,
        amount: float | int,
        importance_scores: Scores | None = None,
        **kwargs,
    ) -> None:
        """Prune `amount` of the group's alive weights (fraction or count), as
        `prune.global_unstructured` does, sharing it out among the tensors as the method decides."""
        parameters = list(parameters)
        scores, alive = {}, []
        for param in parameters:
            mask = alive_mask(*param)
            given = (importance_scores or {}).get(param)
            scores[param] = current_weight(*param) if given is None else given
            alive.append(scores[param].numel() if mask is None else count_true(mask))
        k = count_to_prune(amount, sum(alive))
        per_tensor = cls.split(parameters, scores, alive, k, **kwargs)
        for (module, name), init in zip(parameters, per_tensor, strict=True):
            cls.apply(module, name, importance_scores=scores[module, name], **init)


class GlobalMagnitude(ScorePruning):
    """Global magnitude pruning (IMP): the lowest |w| among all alive weights of the group go."""

    @classmethod
    def split(cls, parameters, scores, alive, k, **kwargs):
        if k == 0:
            return [{"amount": 0} for _ in parameters]
        masks = [alive_mask(*p) for p in parameters]
        threshold, counts = split_smallest([scores[p] for p in parameters], k, masks)
        return [{"amount": n, "threshold": threshold} for n in counts]


class LayerwiseMagnitude(ScorePruning):
    """Layer-wise magnitude pruning: every tensor loses the same fraction of its alive weights."""

    @classmethod
    def split(cls, parameters, scores, alive, k, **kwargs):
        total = sum(alive)
        exact = np.array(alive, dtype=np.float64) * (k / total if total else 0.0)
        counts = np.floor(exact).astype(np.int64)
        # Largest remainders get the leftover weights, so the group total is exactly k.
        leftover = k - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
        return [{"amount": int(n)} for n in counts]


class GlobalRandom(ScorePruning):
    """Random pruning (the paper's baseline): k alive weights drawn uniformly from the group."""

    def __init__(self, amount: float | int, threshold: int | None = None, seed: int | None = None):
        super().__init__(amount, threshold)
        self.seed = seed

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=t.device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        scores = torch.rand(t.shape, generator=generator, device=t.device)
        return super().compute_mask(scores, default_mask)

    @classmethod
    def split(cls, parameters, scores, alive, k, seed: int | None = None, **kwargs):
        # A uniform draw of k from the group puts a multivariate hypergeometric number in each
        # tensor; drawing those counts first lets each tensor be pruned on its own.
        sequence = np.random.SeedSequence(seed)
        rng = np.random.default_rng(sequence)
        counts = rng.multivariate_hypergeometric(alive, k, method="marginals") if alive else []
        seeds = [int(s.generate_state(1)[0]) for s in sequence.spawn(len(alive))]
        return [{"amount": int(n), "seed": s} for n, s in zip(counts, seeds, strict=True)]


class NMMagnitude(BoolMaskPruning):
    """N:M semi-structured pruning (2:4 by default): the N largest |w| of every M in a row stay.

    The M are consecutive weights along a row (the input dimension). 2:4 is the pattern that
    sparse tensor cores run (`torch.sparse.to_sparse_semi_structured`): exactly half of each
    tensor goes, so it is cut once, not in rounds. Ties go to the earlier weight."""

    def __init__(self, n: int = 2, m: int = 4):
        if not 0 < n < m:
            raise ValueError(f"N:M pruning needs 0 < N < M, not {n}:{m}")
        self.n, self.m = n, m

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor | None) -> torch.Tensor:
        if t.dim() < 2 or t.shape[-1] % self.m:
            raise ValueError(
                f"{self.n}:{self.m} pruning needs rows of a multiple of {self.m} weights, not "
                f"a tensor of shape {tuple(t.shape)}"
            )
        groups = t.detach().abs().reshape(-1, self.m)
        if default_mask is not None:  # weights pruned already are the first to stay pruned
            groups = groups.masked_fill(~default_mask.bool().reshape(-1, self.m), -1.0)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, : self.n], True)
        if default_mask is not None:
            keep.logical_and_(default_mask.bool().reshape(-1, self.m))
        return keep.view(t.shape)

    @classmethod
    def prune_group(cls, parameters: Parameters, n: int = 2, m: int = 4) -> None:
        """N:M-prune every tensor of the group (each on its own: the pattern is per row)."""
        for module, name in parameters:
            cls.apply(module, name, n=n, m=m)
