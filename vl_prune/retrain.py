"""A ticket trained elsewhere than where it was found: scored on a task, trained from other
weights (the baselines), with LoRA adapters, or fine-tuned weights scored as they are."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vl_prune.baselines import check_start, load_other_weights, shuffle_within_tensors
from vl_prune.checkpoint import read_state_dict
from vl_prune.distributed import process_state
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.files import atomic_write
from vl_prune.pruning.layout import baked_state, load_plain_state
from vl_prune.pruning.shrink import fit_to
from vl_prune.seeds import Stream, over_seeds, seed_list, seed_of
from vl_prune.task import VLModel
from vl_prune.ticket import FingerprintMismatch, Ticket, current_weights, fingerprint


def train_ticket(
    ticket: Ticket,
    settings: FindSettings,
    force: bool = False,
    quiet: bool = False,
    weights: str = "theta0",
    lora: Lora | None = None,
    log: Callable[[str], None] = lambda line: None,
    save: Path | None = None,
) -> dict[str, Any]:
    """Train a ticket's mask from θ0 (and a fresh head) on `settings.task` and score it, once
    per seed (`settings.seeds`; the result's score is their mean, with `std` and `scores`);
    `weights` "shuffled" starts from θ0 shuffled within each prunable tensor, a file path from
    another pre-trained set (see `vl_prune.baselines`); `lora` trains LoRA adapters over the
    frozen masked backbone instead of the backbone itself. `save`: write the trained weights
    there (`backbone.*` and `head.*`, pruned entries zero), which `vlprune export` takes."""
    check_start(weights)
    if lora is not None and settings.seeds > 1:
        raise VLPruneError("--lora trains one set of adapters: give one seed (drop --seeds)")
    if save is not None and settings.seeds > 1:
        raise VLPruneError("--save writes one model's weights: give one seed (drop --seeds)")
    if save is not None and lora is not None:
        raise VLPruneError("--save writes the backbone's weights; with --lora use --merge")
    experiment = Experiment(settings, log)
    seeds = seed_list(settings.train.seed, settings.seeds)
    results = [
        train_mask(experiment, ticket, force, quiet, weights, lora, seed, save) for seed in seeds
    ]
    return {**results[0], **over_seeds([r["score"] for r in results]), "seeds": seeds}


@dataclass(frozen=True)
class Lora:
    """LoRA adapters on a ticket: their rank, the new folder they are saved in (peft format),
    and where to write the weights with the adapters merged in, mask kept (None: no merge)."""

    rank: int
    adapters: Path | None = None
    merged: Path | None = None

    def __post_init__(self):
        from vl_prune.lora import check_rank

        check_rank(self.rank)

    @classmethod
    def beside(
        cls, rank: int, ticket: Path, task: str, adapters: Path | None, merged: Path | None
    ) -> Lora:
        """The options checked before any training: the adapters' folder must be new (by default
        beside the ticket, named by rank and task) and the merged weights' folder must exist."""
        if adapters is None:
            adapters = ticket.with_name(f"{ticket.stem}.lora-r{rank}-{task}")
        if adapters.exists():
            raise VLPruneError(
                f"--adapters {adapters} already exists; remove it or name another folder"
            )
        if merged is not None and not merged.parent.is_dir():
            raise VLPruneError(f"--merge {merged}: folder {merged.parent} does not exist")
        return cls(rank, adapters, merged)


def ticket_backbone(tickets: Sequence[Ticket], model: str | None) -> str | None:
    """The backbone to train `tickets` on: the one they were found on, which `--model`, if
    given, must name (a ticket's tensors are that backbone's); None if neither says."""
    found = sorted({t.metadata["backbone"] for t in tickets if t.metadata.get("backbone")})
    if model is None:
        if len(found) > 1:
            raise VLPruneError(
                f"the tickets were found on {' and '.join(found)}: give tickets of one backbone"
            )
        return found[0] if found else None
    if other := [backbone for backbone in found if backbone != model]:
        raise VLPruneError(
            f"the ticket was found on {other[0]}, not {model}: drop --model or pass "
            f"--model {other[0]}"
        )
    return model


def train_mask(
    experiment: Experiment,
    ticket: Ticket | None,
    force: bool = False,
    quiet: bool = False,
    weights: str = "theta0",
    lora: Lora | None = None,
    seed: int | None = None,
    save: Path | None = None,
) -> dict[str, Any]:
    """`train_ticket` on an experiment already set up, for one seed (default: the settings');
    `ticket=None` trains the dense model."""
    seed = experiment.settings.train.seed if seed is None else seed
    model = experiment.fresh(seed)
    other = apply_ticket(ticket, model, force) if ticket is not None else False
    result = {}
    if weights == "shuffled":
        shuffle_within_tensors(model, seed_of(seed, Stream.SHUFFLE))
    elif weights != "theta0":
        replaced = load_other_weights(model, weights)
        result["replaced"] = {"taken": len(replaced.taken), "kept": replaced.kept}
    if lora is not None:
        from vl_prune.lora import add_lora

        with torch.random.fork_rng(devices=[]):
            # The adapters' initialisation; the CPU generator only, as the fork restores no other.
            torch.random.default_generator.manual_seed(seed_of(seed, Stream.LORA))
            model = add_lora(model, lora.rank)
    what = "dense" if ticket is None else f"{ticket.sparsity:.0%} ticket"
    what += f" + LoRA r{lora.rank}" if lora is not None else ""
    score, trained = experiment.train(
        model, f"{what} on {experiment.settings.task}", seed=seed, quiet=quiet
    )
    if lora is not None:
        result["lora"] = _finish_lora(experiment, trained, lora, score)
    if save is not None:
        if process_state().is_main_process:
            from safetensors.torch import save as to_bytes

            atomic_write(save, to_bytes(baked_state(trained)))
        process_state().wait_for_everyone()
        result["saved"] = str(save)
    return {
        **_result(ticket, experiment, score),
        "seed": seed,
        "other_weights": other,
        "weights": weights,
        **result,
    }


def _finish_lora(experiment: Experiment, trained: Any, lora: Lora, score: float) -> dict:
    """Save the adapters and, if asked, merge them keeping the mask, score the merged model
    and write its weights (pruned entries zero, torch names)."""
    from vl_prune.lora import merge_lora, save_adapters

    state = process_state()
    out: dict[str, Any] = {"rank": lora.rank}
    if lora.adapters is not None:
        if state.is_main_process:
            settings = experiment.settings
            save_adapters(trained, lora.adapters, task=settings.task, backbone=settings.backbone)
        state.wait_for_everyone()
        out["adapters"] = str(lora.adapters)
    if lora.merged is not None:
        batch = experiment.task.collate(experiment.eval_examples[:8], trained.backbone)
        merged, report = merge_lora(trained, batch)
        merged_score = experiment.score(merged)
        if state.is_main_process:
            from safetensors.torch import save as to_bytes

            atomic_write(lora.merged, to_bytes(baked_state(merged)))
        state.wait_for_everyone()
        out["merge"] = {
            "path": str(lora.merged),
            "score": merged_score,
            "score_before": score,
            "dropped": report.dropped,
            "max_change": report.max_change,
            "report": str(report),
        }
    return out


def score_finetuned(
    ticket: Ticket | None,
    weights: str | Path,
    settings: FindSettings,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Score fine-tuned weights (a VLModel state dict: `backbone.*`, `head.*`, or a
    `vlprune export` of one: a compressed bundle brings its masks, a shrunk model its
    narrower blocks), with the ticket's mask applied, on the evaluation split; no training."""
    from vl_prune.export import BACKBONE, HEAD, is_export, read

    experiment = Experiment(settings, log)
    model = experiment.fresh()
    recorded = None  # the sparsity an export of a ticket records, where no mask says it
    if is_export(weights):
        state, masks, metadata = read(weights)
        if not any(key.startswith(HEAD) for key in state):
            raise VLPruneError(
                f"{weights}: an export without a task head; export the weights `vlprune "
                "evaluate --save` wrote (export --finetuned) to score them"
            )
        if metadata.get("layout") == "shrunk":
            if ticket is not None:
                raise VLPruneError(f"{weights}: a shrunk model has no room for a ticket's masks")
            inner = {k.removeprefix(BACKBONE): v for k, v in state.items()}
            fit_to(model.backbone, model.backbone.structure(), inner)
        if masks and ticket is None:
            ticket = Ticket({k.removeprefix(BACKBONE): m for k, m in masks.items()})
        try:
            recorded = float(metadata["sparsity"]) if "sparsity" in metadata else None
        except ValueError as exc:
            raise VLPruneError(f"{weights}: metadata 'sparsity' is not a number") from exc
    else:
        state = read_state_dict(weights)
    if ticket is not None:
        apply_ticket(ticket, model, force=True)
    load_plain_state(model, state)
    score = experiment.score(model)
    result = _result(
        Ticket.from_model(model.backbone, model.backbone.prunable()), experiment, score
    )
    if ticket is None and recorded is not None:
        result["sparsity"] = recorded
    return result


def apply_ticket(ticket: Ticket, model: VLModel, force: bool) -> bool:
    """Prune `model` to the ticket; whether the ticket came from other weights (only allowed
    with `force`)."""
    found = ticket.metadata.get("weights_fingerprint")
    other = bool(found) and found != fingerprint(current_weights(model.backbone, ticket.masks))
    if other and not force:
        raise VLPruneError(
            "the ticket was found from other weights than this backbone's θ0 "
            "(fingerprint differs); pass --force to train it anyway"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FingerprintMismatch)  # checked above
        ticket.apply(model.backbone)
    return other


def _result(ticket: Ticket | None, experiment: Experiment, score: float) -> dict[str, Any]:
    return {
        "task": experiment.settings.task,
        "metric": experiment.task.metric,
        "score": score,
        "sparsity": 0.0 if ticket is None else ticket.sparsity,
    }
