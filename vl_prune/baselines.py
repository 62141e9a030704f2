"""Where a ticket's training starts besides θ0: the paper's weight baselines.

`shuffled` permutes θ0 within each prunable tensor (every layer keeps its distribution of
values, not where they sit); a weights file (e.g. BERT's) replaces θ0's tensors where the names
match, to test whether a ticket needs the very weights it was found from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vl_prune.checkpoint import read_state_dict
from vl_prune.errors import VLPruneError
from vl_prune.pruning.layout import current_weight, plain_name
from vl_prune.task import VLModel

#: the named starts; anything else given as --weights is a weights file
NAMED = ("theta0", "shuffled")


def shuffle_within_tensors(model: VLModel, seed: int) -> None:
    """Permute the values of each prunable tensor of the backbone in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module, name in model.backbone.prunable():
            weight = current_weight(module, name)
            order = torch.randperm(weight.numel(), generator=generator)
            weight.copy_(weight.reshape(-1)[order].view_as(weight))


@dataclass
class Replaced:
    """What `load_other_weights` took from the file and what it kept from θ0."""

    source: str
    taken: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{len(self.taken)} backbone tensors from {self.source}, "
            f"{len(self.kept)} kept from θ0 ({', '.join(_modules(self.kept)) or 'none'})"
        )


def check_start(weights: str | Path) -> None:
    """`weights` names a start (NAMED) or an existing weights file: checked before any data or
    θ0 is read."""
    if str(weights) not in NAMED and not Path(weights).is_file():
        known = ", ".join(NAMED)
        raise VLPruneError(f"--weights {weights}: no such file (give {known} or a weights file)")


def load_other_weights(model: VLModel, path: str | Path) -> Replaced:
    """Replace the backbone's tensors by another pre-trained set's, matched by parameter path:
    a key equal to it or ending in "." + it, so BERT's `bert.encoder.layer.0.…` fills UNITER's
    `encoder.layer.0.…` (old `gamma`/`beta` LayerNorm names are read as `weight`/`bias`).
    Every prunable tensor must be found with its shape; any other tensor is taken where it fits
    and kept from θ0 otherwise (a BERT file has no image embeddings)."""
    check_start(path)
    path = Path(path)
    state = {
        re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key)): value
        for key, value in read_state_dict(path).items()
    }
    backbone = model.backbone
    prunable = set(backbone.prunable_names())
    report = Replaced(str(path))
    with torch.no_grad():
        for name, target in backbone.named_parameters():
            plain = plain_name(name)
            value = _match(state, plain, path)
            if value is not None and value.shape == target.shape:
                target.copy_(value)
                report.taken.append(plain)
            elif plain in prunable:
                found = "" if value is None else f" (it has shape {tuple(value.shape)})"
                raise VLPruneError(
                    f"--weights {path}: no tensor {plain!r} of shape {tuple(target.shape)}"
                    f"{found}; a ticket's every tensor must come from the other weights"
                )
            else:
                report.kept.append(plain)
    return report


def _match(state: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor | None:
    if name in state:
        return state[name]
    found = [key for key in state if key.endswith("." + name)]
    if len(found) > 1:
        raise VLPruneError(f"--weights {path}: {name!r} is ambiguous ({', '.join(found)})")
    return state[found[0]] if found else None


def _modules(names: list[str]) -> list[str]:
    """The top-level modules of some parameter paths, in order."""
    return list(dict.fromkeys(name.split(".")[0] for name in names))
