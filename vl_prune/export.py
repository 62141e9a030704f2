"""A ticket with its weights as files others use: a plain model with the pruned entries zero,
a compressed bundle (bit-packed masks and only the kept values), a transformers folder, or a
model shrunk to the heads and neurons a structured ticket keeps; and reading them back.

Every file is safetensors with metadata `format` = `vl_prune.export/1`, `layout` (`plain`,
`compressed`, `shrunk`), `backbone`, `preset`, `dtype` and the ticket's provenance. Tensors are
named as in the model: the backbone's paths, under `backbone.` beside a task head's `head.*`
when the weights came with one (`vlprune evaluate --save`). In a compressed bundle a pruned
tensor `<name>` is stored as `<name>:mask` (the ticket's packing) and `<name>:kept` (its kept
values in row-major order); a plain or shrunk file reads anywhere as an ordinary state dict.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl_prune.backbone import Backbone
from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write, write_folder
from vl_prune.pruning.layout import (
    baked_state,
    load_plain_state,
    plain_name,
    pruned_parameters,
    refresh,
)
from vl_prune.pruning.shrink import fit_to, shrink
from vl_prune.ticket import (
    FingerprintMismatch,
    Ticket,
    checked_shape,
    current_weights,
    fingerprint,
    pack_mask,
    unpack_mask,
)

FORMAT = "vl_prune.export/1"
LAYOUTS = ("plain", "compressed", "shrunk")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MASK, KEPT = ":mask", ":kept"
BACKBONE, HEAD = "backbone.", "head."
#: ticket metadata worth carrying into an export (the masks' own bookkeeping is not)
PROVENANCE = ("task", "method", "schedule", "round", "score", "dense_score", "metric")


@dataclass
class Exported:
    """What an export holds: the backbone (masks applied for a compressed bundle, shrunk for a
    shrunk one), the task head's tensors if any, and the file's metadata."""

    backbone: Backbone
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def pruned_backbone(
    ticket: Ticket,
    name: str,
    checkpoint: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    force: bool = False,
) -> tuple[Backbone, dict[str, torch.Tensor]]:
    """The ticket's backbone `name`: θ0 (the embedded world's for a tiny ticket without
    `checkpoint`) pruned to the ticket, with `finetuned` weights loaded if given (`backbone.*`
    and `head.*`, as `vlprune evaluate --save` writes, or the backbone's own names); and the
    head's tensors. Weights other than those the ticket was found from need `force`."""
    from vl_prune.checkpoint import read_state_dict
    from vl_prune.contract import load_checked
    from vl_prune.world import embedded_world

    backbone_class = load_checked("backbones", name)
    preset = ticket.metadata.get("preset")
    if checkpoint is None:
        if preset not in (None, "tiny"):
            raise VLPruneError(
                f"the ticket is for {name}-{preset}: pass --checkpoint with the weights it "
                "was found from"
            )
        backbone = embedded_world().theta0(backbone_class, name)
    else:
        backbone = backbone_class.build(preset, checkpoint)
    expected = ticket.metadata.get("weights_fingerprint")
    if expected and not force:
        found = fingerprint(current_weights(backbone, ticket.masks))
        if found != expected:
            raise VLPruneError(
                "the ticket was found from other weights than these (fingerprint differs); "
                "pass --force to export it anyway"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FingerprintMismatch)  # checked above
        ticket.apply(backbone)
    head: dict[str, torch.Tensor] = {}
    if finetuned is not None:
        if is_export(finetuned):
            state, masks, metadata = read(finetuned)
            if metadata.get("layout") == "shrunk":
                raise VLPruneError(
                    f"{finetuned}: a shrunk model; export from the weights it was shrunk from"
                )
            theirs = {k.removeprefix(BACKBONE): m for k, m in masks.items()}
            if any(not torch.equal(m, ticket.masks.get(k, ~m)) for k, m in theirs.items()):
                raise VLPruneError(f"{finetuned}: its masks are not the ticket's")
        else:
            state = read_state_dict(finetuned)
        if any(key.startswith(BACKBONE) for key in state):
            if stray := [k for k in state if not k.startswith((BACKBONE, HEAD))]:
                raise VLPruneError(
                    f"{finetuned}: tensor {stray[0]!r} is neither backbone.* nor head.*"
                )
            head = {k.removeprefix(HEAD): v for k, v in state.items() if k.startswith(HEAD)}
            state = {
                k.removeprefix(BACKBONE): v for k, v in state.items() if k.startswith(BACKBONE)
            }
        _grow_embeddings(backbone, state, Path(finetuned))
        try:
            load_plain_state(backbone, state)
        except VLPruneError as exc:
            raise VLPruneError(f"{finetuned}: {exc}") from exc
    return backbone, head


def export(
    backbone: Backbone,
    name: str,
    path: str | os.PathLike,
    layout: str = "plain",
    dtype: str = "float32",
    head: Mapping[str, torch.Tensor] | None = None,
    ticket: Ticket | None = None,
) -> Path:
    """Write `backbone` (pruned, registry name `name`) and the head's tensors as `layout` in
    `dtype`, atomically; `ticket` gives the provenance to record."""
    if layout not in LAYOUTS:
        raise VLPruneError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise VLPruneError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    from safetensors.torch import save

    if layout == "shrunk":
        backbone = shrunk(backbone)
    tensors = baked_state(backbone)
    masks = Ticket.from_model(backbone).masks if layout == "compressed" else {}
    prefix = BACKBONE if head else ""
    stored: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in masks:
            stored[prefix + key + MASK] = pack_mask(masks[key])
            stored[prefix + key + KEPT] = _cast(value[masks[key]], dtype)
        else:
            stored[prefix + key] = _cast(value, dtype)
    for key, value in (head or {}).items():
        stored[HEAD + key.removeprefix(HEAD)] = _cast(value.detach().cpu().contiguous(), dtype)
    metadata = {
        "format": FORMAT,
        "layout": layout,
        "backbone": name,
        "preset": backbone.preset,
        "dtype": dtype,
        "shapes": json.dumps({prefix + k: list(masks[k].shape) for k in masks}),
        **_provenance(ticket),
    }
    return atomic_write(path, save(stored, metadata=metadata))


def export_transformers(
    backbone: Backbone,
    folder: str | os.PathLike,
    log: Callable[[str], None] = lambda line: None,
) -> Path:
    """Write the pruned backbone as a `save_pretrained` folder (pruned entries zero) that
    `transformers` loads with no vl_prune installed; with its tokenizer where one can be had
    (offline, a hub tokenizer cannot: `log` says so and the folder has the model only)."""
    model = backbone.transformers_model()
    if model is None:
        raise VLPruneError(
            f"{backbone.label} is not a transformers model: export it as a state dict "
            "(--format plain or compressed)"
        )
    baked = _copy(model)
    for module, name in pruned_parameters(baked):
        torch.nn.utils.prune.remove(module, name)

    try:
        tokenizer = backbone.tokenizer
    except VLPruneError as exc:
        tokenizer = None
        log(f"no tokenizer in the folder: {exc}")

    def build(partial: Path) -> None:
        baked.save_pretrained(partial, safe_serialization=True)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(partial)

    return write_folder(folder, build)


def shrunk(backbone: Backbone) -> Backbone:
    """A copy of `backbone` with the cut heads and neurons removed (see `pruning.shrink`)."""
    structure = backbone.structure()
    if not structure:
        raise VLPruneError(f"{backbone.label} declares no heads and neurons to remove")
    smaller = _copy(backbone)
    before = [block.units for block in structure]
    if shrink(smaller.structure()) == before:
        raise VLPruneError(
            "the ticket cuts no whole head or neuron: nothing to shrink (--shrink is for "
            "structured tickets: find --method structured)"
        )
    return smaller


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a file `export` wrote (a safetensors file with its format tag)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as bundle:
            return (bundle.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """An export's tensors as a state dict (a compressed bundle's expanded: pruned entries
    zero), the masks a compressed bundle carries by tensor name, and the metadata."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="pt") as bundle:
            metadata = bundle.metadata() or {}
            stored = {key: bundle.get_tensor(key) for key in bundle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise VLPruneError(f"{path}: not a readable safetensors export ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise VLPruneError(f"{path}: not a vl_prune export (no format={FORMAT} in its metadata)")
    for key in ("layout", "backbone", "preset"):
        if not metadata.get(key):
            raise VLPruneError(f"{path}: metadata {key!r} is missing")
    if metadata["layout"] not in LAYOUTS:
        raise VLPruneError(f"{path}: unknown layout {metadata['layout']!r}")
    shapes = _shapes(metadata.get("shapes", "{}"), path)
    tensors, masks = {}, {}
    for key, value in stored.items():
        name = key.removesuffix(MASK).removesuffix(KEPT)
        if name == key:
            tensors[key] = value
            continue
        if name not in shapes or name + MASK not in stored or name + KEPT not in stored:
            raise VLPruneError(f"{path}: tensor {key!r} lacks its shape, mask or kept values")
        if key.endswith(KEPT):
            continue
        mask = unpack_mask(value, shapes[name], f"{path}: tensor {key!r}")
        kept = stored[name + KEPT]
        if not kept.is_floating_point() or kept.dim() != 1 or kept.numel() != int(mask.sum()):
            raise VLPruneError(
                f"{path}: tensor {name + KEPT!r} should hold one float for each of the "
                f"{int(mask.sum())} weights its mask keeps, found {kept.dtype} of shape "
                f"{tuple(kept.shape)}"
            )
        tensors[name] = torch.zeros(mask.shape, dtype=kept.dtype)
        tensors[name][mask] = kept
        masks[name] = mask
    return tensors, masks, metadata


def _shapes(text: str, path: Path) -> dict[str, tuple[int, ...]]:
    """The `shapes` metadata of a compressed bundle: tensor name → shape."""
    try:
        shapes = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise VLPruneError(f"{path}: metadata 'shapes' is not valid JSON") from exc
    if not isinstance(shapes, dict):
        raise VLPruneError(f"{path}: metadata 'shapes' is not a JSON object")
    return {
        name: checked_shape(shape, f"{path}: tensor {name!r}") for name, shape in shapes.items()
    }


def load(path: str | os.PathLike) -> Exported:
    """An export read back into a backbone, in eval mode as a model to run: built from its
    preset, embeddings grown and blocks narrowed to the file's shapes, its tensors loaded in
    fp32; a compressed bundle's masks are applied in torch's prune layout."""
    from vl_prune.contract import load_checked

    tensors, masks, metadata = read(path)
    head = {k.removeprefix(HEAD): v for k, v in tensors.items() if k.startswith(HEAD)}
    prefix = BACKBONE if head else ""
    state = {k.removeprefix(prefix): v for k, v in tensors.items() if not k.startswith(HEAD)}
    backbone = load_checked("backbones", metadata["backbone"]).build(metadata["preset"])
    try:
        _grow_embeddings(backbone, state, Path(path))
        if metadata["layout"] == "shrunk":
            fit_to(backbone, backbone.structure(), state)
        if masks:
            Ticket({k.removeprefix(prefix): m for k, m in masks.items()}).apply(backbone)
        known = {plain_name(key) for key in backbone.state_dict()}
        if stray := sorted(state.keys() - known):
            raise VLPruneError(f"tensor {stray[0]!r} is not part of {backbone.label}")
        load_plain_state(backbone, state)
    except VLPruneError as exc:
        raise VLPruneError(f"{path}: {exc}") from exc
    return Exported(backbone.eval(), head, metadata)


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of a pruned model: its masked tensors are recomputed without autograd
    first, as deepcopy copies only tensors that autograd made no graph for."""
    with torch.no_grad():
        for module, name in pruned_parameters(model):
            refresh(module, name)
    return copy.deepcopy(model)


def _grow_embeddings(backbone: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Give every embedding the rows it has in `state`: fine-tuning grows some (a second image
    type, words a task's data adds) and the values come from the file anyway."""
    for name, module in backbone.named_modules():
        value = state.get(f"{name}.weight")
        if isinstance(module, nn.Embedding) and value is not None:
            if value.shape[1:] != module.weight.shape[1:]:
                raise VLPruneError(f"{path}: tensor {name + '.weight'!r} has the wrong width")
            if value.shape[0] != module.num_embeddings:
                module.weight = nn.Parameter(module.weight.new_zeros(value.shape))
                module.num_embeddings = value.shape[0]


def _cast(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor


def _provenance(ticket: Ticket | None) -> dict[str, str]:
    if ticket is None:
        return {}
    found = {k: ticket.metadata.get(k) for k in PROVENANCE}
    found["sparsity"] = ticket.sparsity
    found["weights_fingerprint"] = ticket.metadata.get("weights_fingerprint")
    return {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in found.items() if v is not None
    }
