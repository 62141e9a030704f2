"""`vlprune evaluate`: train a ticket on a task and print its score (or score fine-tuned
weights as they are)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vl_prune_cli.errors import UserError
from vl_prune_cli.options import (
    DEFAULT_BACKBONE,
    adversarial_options,
    check_names,
    find_settings,
    new_file,
    ticket_model_option,
    training_options,
    weights_and_data_options,
)
from vl_prune_cli.output import percent, progress


@click.command("evaluate")
@click.option("--ticket", type=click.Path(path_type=Path), help="Ticket to train and score.")
@click.option("--task", required=True, help="Task plugin to score on.")
@ticket_model_option
@weights_and_data_options
@training_options
@adversarial_options
@click.option(
    "--finetuned",
    type=click.Path(path_type=Path),
    help="Score these fine-tuned weights (backbone.* and head.*) instead of training.",
)
@click.option(
    "--save",
    type=click.Path(path_type=Path),
    help="Write the trained weights here (.safetensors; backbone.* and head.*, pruned entries "
    "zero), for `vlprune export --finetuned`.",
)
@click.option("--force", is_flag=True, help="Train a ticket found from other weights anyway.")
@click.option(
    "--lora", type=int, help="Train rank-R LoRA adapters over the frozen masked backbone."
)
@click.option(
    "--adapters",
    type=click.Path(path_type=Path),
    help="New folder for the LoRA adapters (peft format) [beside the ticket].",
)
@click.option(
    "--merge",
    type=click.Path(path_type=Path),
    help="Also merge the adapters, mask kept, and write the weights here (.safetensors).",
)
@click.option(
    "--weights",
    default="theta0",
    show_default=True,
    help="Start from θ0; from θ0 shuffled within each layer (`shuffled`); or from another "
    "pre-trained weights file (e.g. BERT's), its tensors matched by name (baselines).",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(
    ticket: Path | None,
    task: str,
    backbone: str | None,
    preset: str | None,
    checkpoint: str | None,
    tokenizer: str | None,
    data: str | None,
    finetuned: Path | None,
    save: Path | None,
    force: bool,
    lora: int | None,
    adapters: Path | None,
    merge: Path | None,
    weights: str,
    quiet: bool,
    as_json: bool,
    **training: Any,
) -> None:
    """Train a ticket from θ0 on a task and score it (or score fine-tuned weights)."""
    check_names(backbones=backbone, tasks=task)
    new_file("--merge", merge)
    new_file("--save", save)
    if save is not None and finetuned is not None:
        raise UserError("--save writes trained weights; --finetuned trains nothing")
    if save is not None and lora is not None:
        raise UserError("--save writes the backbone's weights; with --lora use --merge")
    if save is not None and training.get("seeds", 1) > 1:
        raise UserError("--save writes one model's weights: give one seed (drop --seeds)")
    from vl_prune.distributed import process_state
    from vl_prune.retrain import Lora, score_finetuned, ticket_backbone, train_ticket
    from vl_prune.ticket import Ticket

    if lora is None and (adapters is not None or merge is not None):
        raise UserError(f"{'--adapters' if adapters is not None else '--merge'} needs --lora R")
    if lora is not None and ticket is None:
        raise UserError("--lora trains adapters over a ticket: give --ticket")
    loaded = Ticket.load(ticket) if ticket is not None else None
    if loaded is not None:
        backbone = ticket_backbone([loaded], backbone)
    settings = find_settings(
        task,
        backbone or DEFAULT_BACKBONE,
        training,
        data=data,
        preset=preset,
        checkpoint=checkpoint,
        tokenizer=tokenizer,
    )
    if finetuned is not None and (weights != "theta0" or settings.train.adversarial):
        flag = "--weights" if weights != "theta0" else "--adversarial"
        raise UserError(f"{flag} chooses how to train; --finetuned trains nothing")
    if finetuned is not None and lora is not None:
        raise UserError("--lora chooses how to train; --finetuned trains nothing")
    if finetuned is not None and settings.seeds > 1:
        raise UserError("--seeds repeats training; --finetuned trains nothing")
    say = progress(quiet)
    if finetuned is not None:
        result = score_finetuned(loaded, finetuned, settings, log=say)
    elif loaded is None:
        raise UserError("evaluate needs --ticket (to train) or --finetuned (to score)")
    else:
        options = None if lora is None else Lora.beside(lora, ticket, task, adapters, merge)
        result = train_ticket(
            loaded,
            settings,
            force=force,
            quiet=quiet,
            weights=weights,
            lora=options,
            log=say,
            save=save,
        )
    if not process_state().is_main_process:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{result['task']} {result['metric']}: {result['score']:.4f}{_spread(result)} at "
        f"{percent(result['sparsity'])} sparsity"
        + _start(result)
        + (" (adversarial)" if settings.train.adversarial else "")
        + (f" with LoRA r{result['lora']['rank']}" if "lora" in result else "")
    )
    if "saved" in result:
        click.echo(f"weights: {result['saved']}")
    if "lora" in result:
        click.echo(f"adapters: {result['lora']['adapters']}")
        merged = result["lora"].get("merge")
        if merged is not None:
            click.echo(merged["report"])
            click.echo(
                f"merged {result['metric']}: {merged['score']:.4f} "
                f"(with adapters {merged['score_before']:.4f}); weights: {merged['path']}"
            )


def _start(result: dict[str, Any]) -> str:
    """Where training started, when not from θ0."""
    if result.get("weights", "theta0") == "theta0":
        return ""
    if result["weights"] == "shuffled":
        return " from shuffled θ0"
    kept = result["replaced"]["kept"]
    return f" from {result['weights']}" + (f" ({len(kept)} tensors kept from θ0)" if kept else "")


def _spread(result: dict[str, Any]) -> str:
    """± the std over seeds, with each seed's score, when there were several."""
    scores = result.get("scores", [])
    if len(scores) < 2:
        return ""
    each = ", ".join(f"{score:.4f}" for score in scores)
    return f" ± {result['std']:.4f} (mean of {len(scores)} seeds: {each})"
