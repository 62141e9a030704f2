"""A third-party pruning method, registered through the `vl_prune.methods` entry point."""

import torch

from vl_prune.pruning import LayerwiseMagnitude


class LargestFirst(LayerwiseMagnitude):
    """Prunes the largest weights of each tensor first: a sanity check that magnitude matters."""

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return super().compute_mask(1.0 / (t.detach().abs() + 1e-30), default_mask)
