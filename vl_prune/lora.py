"""LoRA adapters (peft) over a pruned VLModel: train, save, load and merge them mask-safely.

peft wraps each prunable linear layer; the pruned `nn.Linear` stays inside as the wrapper's
`base_layer`, prune pre-hook included, so a forward computes (mask ⊙ W_orig) x + B A x. What
does not survive is peft's merge: it adds B A to the `weight` tensor the prune hook computed on
the last forward, and the next forward recomputes that tensor from `weight_orig`, so the update
is silently lost. Adapters are therefore saved on their own (peft format) beside the ticket,
peft's merge refuses on pruned layers, and `merge_lora` merges into `weight_orig` instead: the
mask is kept, and the part of the update that fell on pruned weights is dropped and reported.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vl_prune.errors import VLPruneError
from vl_prune.files import write_folder
from vl_prune.pruning.layout import alive_mask, current_weight, refresh, stored_parameter
from vl_prune.task import TaskBatch, VLModel
from vl_prune.ticket import Ticket, fingerprint, named_parameters

if TYPE_CHECKING:
    from peft import PeftModel

FORMAT = "vl_prune.lora/1"
#: beside peft's adapter_config.json and adapter_model.safetensors: which ticket they belong to
METADATA = "vl_prune_lora.json"
HEAD = "head"


def check_rank(rank: int) -> None:
    """A LoRA rank must be a positive int."""
    if rank < 1:
        raise VLPruneError(f"--lora must be a rank of at least 1, not {rank}")


def add_lora(
    model: VLModel, rank: int, alpha: int | None = None, dropout: float = 0.0
) -> PeftModel:
    """Wrap `model` (in place, as peft does) with rank-`rank` LoRA adapters on the backbone's
    prunable linear layers and a trainable copy of the head; everything else, the pruned
    weights' `weight_orig` included, is frozen and the masks are untouched. `alpha` defaults
    to `rank` (scaling 1)."""
    check_rank(rank)
    if alpha is not None and alpha <= 0:
        raise VLPruneError(f"LoRA alpha must be positive, not {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise VLPruneError(f"LoRA dropout must be in [0, 1), not {dropout}")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=_pattern(_targets(model)),
        modules_to_save=[HEAD],
    )
    return _checked(get_peft_model(model, config))


def load_adapters(model: VLModel, folder: str | os.PathLike, force: bool = False) -> PeftModel:
    """Adapters saved by `save_adapters`, put on `model` (pruned to the same ticket, on the
    same weights) for inference; other masks or weights are an error unless `force`."""
    from peft import PeftModel

    folder = Path(folder)
    saved = _read_metadata(folder)
    if not force:
        own = _provenance(model)
        for key, what in (("masks_fingerprint", "ticket"), ("weights_fingerprint", "weights")):
            if saved.get(key) != own[key]:
                raise VLPruneError(
                    f"{folder}: the adapters were trained on another {what} than this "
                    "model's; pass --force to load them anyway"
                )
    return _checked(PeftModel.from_pretrained(model, str(folder)))


def save_adapters(model: PeftModel, folder: str | os.PathLike, **metadata: Any) -> Path:
    """Write the adapters and the head in peft's format (adapter_config.json,
    adapter_model.safetensors) into the new folder `folder`, atomically, with a small json
    naming the ticket and weights they were trained on (and `metadata`, e.g. the task)."""
    record = {"format": FORMAT, **metadata, **_provenance(model)}
    config = model.peft_config[model.active_adapter]
    record.update(rank=config.r, alpha=config.lora_alpha)
    text = json.dumps(record, indent=2, sort_keys=True, default=str)

    def build(partial: Path) -> None:
        model.save_pretrained(str(partial))
        (partial / METADATA).write_text(text + "\n")

    return write_folder(folder, build)


@dataclass
class MergeReport:
    """What `merge_lora` did. `dropped` is the share of the LoRA update's squared Frobenius
    norm that fell on pruned weights and was dropped (per merged layer in `layers`); the
    output changes are those of the batch given to `merge_lora`, None without one."""

    merged: int
    pruned: int
    dropped: float
    layers: dict[str, float] = field(default_factory=dict)
    max_change: float | None = None
    mean_change: float | None = None

    def __str__(self) -> str:
        line = (
            f"merged {self.merged} LoRA layers ({self.pruned} pruned): masks kept, "
            f"{self.dropped:.1%} of the LoRA update fell on pruned weights and was dropped"
        )
        if self.max_change is not None:
            line += (
                f"; outputs changed by at most {self.max_change:.3g} (mean {self.mean_change:.3g})"
            )
        return line


def merge_lora(model: PeftModel, batch: TaskBatch | None = None) -> tuple[VLModel, MergeReport]:
    """Fold the adapters into the backbone and return the plain VLModel (all parameters
    trainable again) with a report. Into a pruned layer the update goes to `weight_orig`, so
    the prune hook keeps masking it: masks and sparsity are unchanged, and the update's share
    on pruned weights is dropped. With `batch`, the report says how much that moved the outputs.
    `model` is consumed."""
    from peft.tuners.lora import LoraLayer

    if not hasattr(model, "get_base_model"):
        raise VLPruneError("merge_lora takes a model with LoRA adapters (add_lora, load_adapters)")
    before = _outputs(model, batch) if batch is not None else None
    merged = pruned = 0
    total = dropped = 0.0
    layers: dict[str, float] = {}
    for name, layer in model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        mask = alive_mask(base, "weight")
        # Into weight_orig where pruned: the hook then masks the merged weight on every forward.
        target = stored_parameter(base, "weight")
        layer_total = layer_dropped = 0.0
        with torch.no_grad():
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                delta = layer.get_delta_weight(adapter)
                target.add_(delta.to(target.dtype))
                layer_total += float(delta.double().square().sum())
                if mask is not None:
                    layer_dropped += float(delta[~mask].double().square().sum())
            if mask is not None:
                refresh(base, "weight")
        total += layer_total
        dropped += layer_dropped
        layers[name] = layer_dropped / layer_total if layer_total else 0.0
        merged += 1
        pruned += mask is not None
    _keep_trained_copies(model)
    plain = model.unload()
    plain.requires_grad_(True)
    report = MergeReport(merged, pruned, dropped / total if total else 0.0, layers)
    if before is not None:
        change = (_outputs(plain, batch) - before).abs()
        report.max_change = float(change.max())
        report.mean_change = float(change.mean())
    return plain, report


def _keep_trained_copies(model: PeftModel) -> None:
    """Copy each trained module (the head, `modules_to_save`) into the module it wraps: peft
    0.22's `unload` gives back the wrapped original, peft before it the trained copy."""
    from peft.utils import ModulesToSaveWrapper

    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            # peft lets one active adapter at most hold a wrapper's trained copy; with none
            # (adapters disabled), the wrapper is left as peft unloads it.
            active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
            if active:
                trained = wrapper.modules_to_save[active[0]].state_dict()
                wrapper.original_module.load_state_dict(trained)


def lora_ticket(model: nn.Module) -> Ticket:
    """The masks of a VLModel's backbone, LoRA-wrapped or not, named as tickets name them
    (`Ticket.from_model` would see peft's wrappers as unpruned layers)."""
    backbone = model.backbone
    pairs = backbone.prunable()
    masks = {}
    for name, (module, attr) in zip(named_parameters(backbone, pairs), pairs, strict=True):
        base = _base(module)
        mask = alive_mask(base, attr)
        if mask is None:
            mask = torch.ones_like(current_weight(base, attr), dtype=torch.bool)
        masks[name] = mask.detach().to("cpu", copy=True)
    return Ticket(masks)


def _targets(model: VLModel) -> list[str]:
    """Full module names of the backbone's prunable linear layers, as peft keys them."""
    paths = {id(module): path for path, module in model.named_modules()}
    targets = []
    for module, attr in model.backbone.prunable():
        if attr != "weight" or not isinstance(module, nn.Linear):
            raise VLPruneError(
                f"LoRA adapts linear weights only; the backbone's prunable {attr} of a "
                f"{type(module).__name__} is not one"
            )
        targets.append(paths[id(module)])
    return targets


def _pattern(names: list[str]) -> str:
    # A regex keeps peft to exactly these modules: given 20 names or more as a list, peft
    # rewrites them into bare suffixes ("dense", "query") that can match other modules.
    return "|".join(re.escape(name) for name in names)


def _checked(model: PeftModel) -> PeftModel:
    """`model` after checking peft wrapped only the head, and with peft's merge disabled on
    pruned layers, where it would be silently lost."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    for name, module in model.get_base_model().named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name != HEAD:
            # peft picks modules to save by name suffix: a backbone module ending in "head"
            # would be trained dense beside the adapters.
            raise VLPruneError(f"peft would also train the backbone module {name!r} as a head")
        if (
            isinstance(module, LoraLayer)
            and alive_mask(module.get_base_layer(), "weight") is not None
        ):
            module.merge = _refusal(name)
    return model


def _refusal(name: str):
    def merge(*args: Any, **kwargs: Any) -> None:
        raise VLPruneError(
            f"peft cannot merge LoRA into the pruned layer {name}: the prune hook would "
            "overwrite the merged weight on the next forward; use vl_prune.lora.merge_lora, "
            "which keeps the mask"
        )

    return merge


def _provenance(model: nn.Module) -> dict[str, Any]:
    """Fingerprints of the masks and of the prunable weights (the ticket's θ0 fingerprint while
    the base is frozen), and the sparsity."""
    ticket = lora_ticket(model)
    backbone = model.backbone
    pairs = backbone.prunable()
    names = named_parameters(backbone, pairs)
    weights = {n: current_weight(_base(m), a) for n, (m, a) in zip(names, pairs, strict=True)}
    return {
        "masks_fingerprint": fingerprint(ticket.masks),
        "weights_fingerprint": fingerprint(weights),
        "sparsity": ticket.sparsity,
    }


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not path.is_file():
        raise VLPruneError(f"{folder}: no {METADATA}; not a folder written by save_adapters")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VLPruneError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise VLPruneError(f"{path}: unsupported format (expected {FORMAT})")
    return record


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def _outputs(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Every output tensor of `model` on `batch` (in eval mode), flattened into one."""
    # Modes restored module by module: a PeftModel says it trains while the model it wraps
    # may be in eval mode, and train(True) on it would switch every dropout on.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        device = next(model.parameters()).device
        outputs = model(batch.to(device))
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat([t.detach().float().reshape(-1) for t in _tensors(outputs)])


def _tensors(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = [outputs[key] for key in sorted(outputs)]
    return [t for item in outputs for t in _tensors(item)]
