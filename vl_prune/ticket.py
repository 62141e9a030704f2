"""Ticket: a lottery ticket's masks as a bit-packed safetensors bundle, with its provenance.

A bundle holds one uint8 tensor per prunable parameter, named by its path in the backbone: the
bool mask flattened row-major and packed 8 weights per byte, most significant bit first (numpy's
`packbits` order), zero-padded. The safetensors header's `__metadata__` carries the format tag,
the shapes and where the ticket came from. No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write
from vl_prune.pruning import KeepMask
from vl_prune.pruning.layout import alive_mask, is_parameter, pruned_parameters, stored_parameter

FORMAT = "vl_prune.ticket/1"
# Metadata values stored as JSON text; everything else is a plain string.
_JSON_KEYS = {
    "shapes",
    "history",
    "sparsity",
    "round",
    "score",
    "dense_score",
    "seed",
    "seeds",
    "std",
    "scores",
    "dense_std",
}


class FingerprintMismatch(UserWarning):
    """A ticket is applied to weights other than those it was found from."""


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the given tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def named_parameters(model: nn.Module, parameters: Iterable[tuple[nn.Module, str]]) -> list[str]:
    """The dotted path of each (module, name) pair inside `model`."""
    paths = {id(module): path for path, module in model.named_modules()}
    names = []
    for module, name in parameters:
        if id(module) not in paths:
            raise ValueError(f"a {type(module).__name__} to prune is not part of the model")
        names.append(f"{paths[id(module)]}.{name}" if paths[id(module)] else name)
    return names


def current_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The unmasked values of the named weights (`<name>_orig` where a tensor is pruned)."""
    return {name: stored_parameter(*_locate(model, name)) for name in names}


def _locate(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module and attribute of a ticket tensor; it must be a parameter (pruned or not)."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if module is None or not isinstance(getattr(module, attr, None), torch.Tensor):
        raise VLPruneError(f"ticket tensor {name!r} has no matching parameter in the model")
    if not is_parameter(module, attr):
        raise VLPruneError(f"ticket tensor {name!r} is not a parameter of the model")
    return module, attr


@dataclass
class Ticket:
    """Bool masks by parameter path (True = weight kept) and metadata on how they were found."""

    masks: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        parameters: Iterable[tuple[nn.Module, str]] | None = None,
        **metadata: Any,
    ) -> Ticket:
        """The masks of a pruned model. With `parameters`, every listed tensor is included
        (all-kept where it is not pruned); without, every pruned tensor in the model."""
        parameters = list(pruned_parameters(model) if parameters is None else parameters)
        masks = {}
        for name, (module, attr) in zip(
            named_parameters(model, parameters), parameters, strict=True
        ):
            mask = alive_mask(module, attr)
            if mask is None:
                mask = torch.ones_like(getattr(module, attr), dtype=torch.bool)
            masks[name] = mask.detach().to("cpu", copy=True)
        return cls(masks, dict(metadata))

    @property
    def total(self) -> int:
        """Number of weights the ticket covers."""
        return sum(m.numel() for m in self.masks.values())

    @property
    def pruned(self) -> int:
        """Number of weights the ticket removes."""
        return sum(m.numel() - int(torch.count_nonzero(m)) for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the covered weights that are pruned."""
        return self.pruned / self.total if self.total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction pruned in each tensor."""
        return {
            n: 1.0 - int(torch.count_nonzero(m)) / m.numel() if m.numel() else 0.0
            for n, m in self.masks.items()
        }

    def iou(self, other: Ticket) -> float:
        """Intersection over union of the kept weights of two tickets over the same tensors."""
        if self.masks.keys() != other.masks.keys():
            missing = sorted(self.masks.keys() ^ other.masks.keys())
            raise VLPruneError(f"tickets cover different tensors (e.g. {missing[0]!r})")
        both = either = 0
        for name, mask in self.masks.items():
            theirs = other.masks[name]
            if mask.shape != theirs.shape:
                raise VLPruneError(
                    f"tensor {name!r} has shape {tuple(mask.shape)} in one ticket "
                    f"and {tuple(theirs.shape)} in the other"
                )
            both += int(torch.count_nonzero(mask & theirs))
            either += int(torch.count_nonzero(mask | theirs))
        return both / either if either else 1.0

    def apply(self, model: nn.Module, strict: bool = False) -> None:
        """Prune `model` to this ticket with the bool-mask method (intersecting existing masks).

        Everything is checked before any module changes: a missing tensor or a wrong shape is an
        error naming it; weights other than those the ticket was found from warn, or fail under
        `strict`.
        """
        targets = {}
        for name, mask in self.masks.items():
            module, attr = _locate(model, name)
            shape = getattr(module, attr).shape
            if shape != mask.shape:
                raise VLPruneError(
                    f"ticket tensor {name!r} has shape {tuple(mask.shape)} "
                    f"but the model's parameter has shape {tuple(shape)}"
                )
            targets[name] = (module, attr)
        expected = self.metadata.get("weights_fingerprint")
        if expected and fingerprint(current_weights(model, self.masks)) != expected:
            message = "the model's weights are not the ones this ticket was found from"
            if strict:
                raise VLPruneError(message)
            warnings.warn(message, FingerprintMismatch, stacklevel=2)
        for name, (module, attr) in targets.items():
            device = getattr(module, attr).device
            KeepMask.apply(module, attr, importance_scores=self.masks[name].to(device))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle atomically; an existing file is replaced only by a complete one."""
        from safetensors.torch import save

        metadata = {k: v for k, v in self.metadata.items() if v is not None}
        metadata.update(
            format=FORMAT,
            shapes={n: list(m.shape) for n, m in self.masks.items()},
            sparsity=self.sparsity,
            vl_prune_version=_version(),
            created=metadata.get("created") or _now(),
        )
        header = {k: v if isinstance(v, str) else _to_json(k, v) for k, v in metadata.items()}
        packed = {n: pack_mask(m) for n, m in self.masks.items()}
        return atomic_write(path, save(packed, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ticket:
        """Read a bundle; a damaged file, an unknown format or a bad tensor is a clear error."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise VLPruneError(f"{path}: a folder; expected a ticket file (.safetensors)")
        if not path.is_file():
            raise VLPruneError(f"{path}: no such ticket file")
        try:
            with safe_open(path, framework="pt") as bundle:
                header = bundle.metadata() or {}
                tensors = {name: bundle.get_tensor(name) for name in bundle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise VLPruneError(f"{path}: not a readable safetensors ticket ({exc})") from exc
        if "format" not in header:
            raise VLPruneError(f"{path}: not a ticket (its metadata lacks format={FORMAT})")
        if header["format"] != FORMAT:
            found = header["format"]
            raise VLPruneError(f"{path}: unsupported ticket format {found!r} (expected {FORMAT})")
        metadata = {}
        for key, value in header.items():
            try:
                metadata[key] = json.loads(value) if key in _JSON_KEYS else value
            except json.JSONDecodeError as exc:
                raise VLPruneError(f"{path}: metadata {key!r} is not valid JSON") from exc
            except RecursionError as exc:
                raise VLPruneError(f"{path}: metadata {key!r} is nested too deeply") from exc
        shapes = metadata.get("shapes")
        if not isinstance(shapes, dict):
            raise VLPruneError(f"{path}: metadata 'shapes' is missing")
        masks = {}
        for name, stored in tensors.items():
            if name not in shapes:
                raise VLPruneError(f"{path}: tensor {name!r} has no shape in the metadata")
            where = f"{path}: tensor {name!r}"
            masks[name] = unpack_mask(stored, checked_shape(shapes[name], where), where)
        if missing := sorted(shapes.keys() - tensors.keys()):
            raise VLPruneError(f"{path}: tensor {missing[0]!r} is listed but not stored")
        return cls(masks, metadata)


def _to_json(key: str, value: Any) -> str:
    def plain(obj: Any) -> Any:
        if hasattr(obj, "item"):  # numpy and torch scalars
            return obj.item()
        raise VLPruneError(f"ticket metadata {key!r}: {type(obj).__name__} is not JSON data")

    return json.dumps(value, default=plain)


def checked_shape(shape: Any, where: str) -> tuple[int, ...]:
    """A shape read from JSON metadata: a list of non-negative ints, else an error naming
    `where`."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise VLPruneError(f"{where} has a bad shape {shape!r}")
    return tuple(shape)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask flattened row-major and packed 8 per byte, most significant bit first."""
    flat = mask.detach().to("cpu", torch.bool).contiguous().reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(stored: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """The bool mask of `shape` that `pack_mask` packed (or a bool tensor as it is); `where`
    names it in errors."""
    n = math.prod(shape)
    if stored.dtype == torch.bool:
        if tuple(stored.shape) != shape:
            raise VLPruneError(f"{where} has shape {tuple(stored.shape)}, expected {shape}")
        return stored
    if stored.dtype != torch.uint8 or stored.dim() != 1 or stored.numel() != (n + 7) // 8:
        raise VLPruneError(
            f"{where} should be {(n + 7) // 8} packed uint8 bytes for shape {shape}, "
            f"found {stored.dtype} of shape {tuple(stored.shape)}"
        )
    bits = np.unpackbits(stored.numpy())
    if bits[n:].any():
        raise VLPruneError(f"{where} has bits set in its padding: the file is damaged")
    return torch.from_numpy(bits[:n].view(np.bool_)).reshape(shape)


def _version() -> str:
    from vl_prune.revision import revision

    return revision()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
