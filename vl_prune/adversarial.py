"""Adversarial fine-tuning in embedding space (VILLA, after FreeLB): one step's gradients.

Additive perturbations of the word embeddings and of the raw image input are pushed uphill on
the task loss for K steps of L2-normalised size `lr`, each example's perturbation projected
onto a ball of radius `max_norm` if one is set. The model's gradients accumulate the clean loss
and, averaged over the K steps, the task loss on the perturbed input plus `kl` × the symmetric
KL between the clean and the perturbed predictions; the caller then takes one optimizer step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from vl_prune.errors import VLPruneError
from vl_prune.task import Task, TaskBatch

MODALITIES = ("text", "image", "both")


@dataclass(frozen=True)
class AdversarialSettings:
    """VILLA's knobs, named after their flags (`--adv-steps`, …); `max_norm` 0 means no bound."""

    steps: int = 3
    lr: float = 1e-3
    max_norm: float = 0.0
    kl: float = 1.5
    modality: str = "both"

    def __post_init__(self):
        if self.steps < 1:
            raise VLPruneError(f"--adv-steps must be at least 1, not {self.steps}")
        if self.lr <= 0:
            raise VLPruneError(f"--adv-lr must be positive, not {self.lr}")
        if self.max_norm < 0:
            raise VLPruneError(f"--adv-max-norm must be 0 (no bound) or more, not {self.max_norm}")
        if self.kl < 0:
            raise VLPruneError(f"--adv-kl must not be negative, not {self.kl}")
        if self.modality not in MODALITIES:
            raise VLPruneError(
                f"--adv-modality must be {', '.join(MODALITIES)}, not {self.modality!r}"
            )


#: one (text_delta, image_delta) pair per VLBatch of a TaskBatch; None leaves that input clean
Deltas = list[tuple[torch.Tensor | None, torch.Tensor | None]]


@dataclass
class AdversarialStep:
    """What one step did: the clean loss (the step's reported loss), the task loss on the
    input of each ascent step, and the final perturbations."""

    loss: torch.Tensor
    perturbed_losses: list[float] = field(default_factory=list)
    deltas: Deltas = field(default_factory=list)


def adversarial_backward(
    model: Any,
    task: Task,
    batch: TaskBatch,
    settings: AdversarialSettings,
    accelerator: Any,
) -> AdversarialStep:
    """Accumulate one adversarial step's gradients into `model` (already through
    `accelerator.prepare`); gradients are synchronised across processes once, on the last pass.

    The clean pass runs with zero perturbations that require grad, so its backward also gives
    the first ascent direction: every one of the K perturbed passes sees a real perturbation.
    """
    backbone = accelerator.unwrap_model(model).backbone
    deltas = _zeros(backbone, batch, settings.modality)
    with accelerator.no_sync(model):
        clean = model(batch, deltas=deltas)
        loss = task.loss(clean, batch.targets)
        if not torch.isfinite(loss):
            return AdversarialStep(loss)  # the caller reports it; nothing to perturb
        accelerator.backward(loss)
    reference = _detached(clean)
    step = AdversarialStep(loss.detach())
    for k in range(settings.steps):
        deltas = _ascend(deltas, settings)
        last = k == settings.steps - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            perturbed = model(batch, deltas=deltas)
            task_loss = task.loss(perturbed, batch.targets)
            total = task_loss + settings.kl * task.consistency(reference, perturbed)
            if not torch.isfinite(total):
                raise VLPruneError(
                    f"the loss on perturbed input became {total.item()} at ascent step {k + 1}; "
                    "lower --adv-lr or bound the perturbation with --adv-max-norm"
                )
            accelerator.backward(total / settings.steps)
        step.perturbed_losses.append(task_loss.item())
    step.deltas = [tuple(_plain(d) for d in pair) for pair in deltas]
    return step


def _zeros(backbone: Any, batch: TaskBatch, modality: str) -> Deltas:
    deltas = []
    for inputs in batch.inputs:
        text, image = backbone.perturbation_shapes(inputs)
        device = inputs.input_ids.device
        deltas.append(
            (
                torch.zeros(text, device=device) if modality != "image" else None,
                torch.zeros(image, device=device) if modality != "text" else None,
            )
        )
    for pair in deltas:
        for delta in pair:
            if delta is not None:
                delta.requires_grad_()
    return deltas


def _ascend(deltas: Deltas, settings: AdversarialSettings) -> Deltas:
    """One ascent step: each example's perturbation moves `lr` along its normalised gradient,
    then is pulled back onto the `max_norm` ball."""
    return [tuple(_step(d, settings) for d in pair) for pair in deltas]


def _step(delta: torch.Tensor | None, settings: AdversarialSettings) -> torch.Tensor | None:
    if delta is None:
        return None
    grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
    grad = grad.float().nan_to_num(0.0)  # an fp16 overflow must not poison the perturbation
    moved = delta.detach() + settings.lr * grad / _norms(grad).clamp_min(1e-12)
    if settings.max_norm > 0:
        moved = moved * (settings.max_norm / _norms(moved)).clamp(max=1.0)
    return moved.requires_grad_()


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Each example's L2 norm, shaped to broadcast over the example."""
    return x.reshape(x.shape[0], -1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _detached(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return {key: _detached(value) for key, value in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_detached(value) for value in outputs)
    return outputs.detach()


def _plain(delta: torch.Tensor | None) -> torch.Tensor | None:
    return None if delta is None else delta.detach()
