"""`vlprune transfer`: train tickets on other tasks and print how they score against each task's
dense model."""

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
    runs_option,
    ticket_model_option,
    training_options,
    weights_and_data_options,
    writable_folder,
)
from vl_prune_cli.output import percent, progress


@click.command()
@click.option(
    "--ticket",
    "sources",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Ticket file or run folder (its pruned rounds); repeat for a table.",
)
@click.option(
    "--task", "tasks", multiple=True, required=True, help="Target task; repeat for a table."
)
@ticket_model_option
@weights_and_data_options
@training_options
@adversarial_options
@click.option("--force", is_flag=True, help="Train tickets found from other weights anyway.")
@click.option(
    "--lora",
    type=int,
    help="Train rank-R LoRA adapters over each frozen masked backbone (kept beside each result).",
)
@runs_option
@click.option(
    "--out", type=click.Path(path_type=Path), help="Folder for transfer.json, .md and .png."
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def transfer(
    sources: tuple[Path, ...],
    tasks: tuple[str, ...],
    backbone: str | None,
    preset: str | None,
    checkpoint: str | None,
    tokenizer: str | None,
    data: str | None,
    force: bool,
    lora: int | None,
    runs: Path,
    out: Path | None,
    quiet: bool,
    as_json: bool,
    **training: Any,
) -> None:
    """Train tickets from θ0 on other tasks and score them against each task's dense model."""
    for task in tasks:
        check_names(backbones=backbone, tasks=task)
    writable_folder("--out", out)
    writable_folder("--runs", runs)
    from vl_prune import transfer as transfers
    from vl_prune.distributed import process_state
    from vl_prune.plots import transfer_heatmap
    from vl_prune.retrain import ticket_backbone
    from vl_prune.ticket import Ticket

    paths = transfers.ticket_paths(sources)
    targets = list(dict.fromkeys(tasks))
    if data is not None and len(targets) > 1:
        raise UserError("--data is one task's folder: give a single --task with it")
    main_process = process_state().is_main_process
    backbone = ticket_backbone([Ticket.load(path) for path in paths], backbone)
    backbone = backbone or DEFAULT_BACKBONE
    log = progress(quiet)
    say = click.echo if main_process and not quiet and len(paths) * len(targets) > 1 else None
    results = []
    for task in targets:
        settings = find_settings(
            task,
            backbone,
            training,
            data=data,
            preset=preset,
            checkpoint=checkpoint,
            tokenizer=tokenizer,
        )
        target = transfers.Transfer(settings, runs=runs, quiet=quiet, lora=lora, log=log)
        for path in paths:
            results.append(target.run(path, force=force))
            if say is not None:
                say(f"{transfers.label(results[-1])} → {_line(results[-1])}", err=True)
    if not main_process:
        return
    table = transfers.table(results)
    if out is not None:
        from vl_prune.files import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "transfer.json", json.dumps(table, indent=2).encode())
        atomic_write(out / "transfer.md", transfers.markdown(table).encode())
        transfer_heatmap(table, out / "transfer.png")
    if as_json:
        click.echo(json.dumps(table if len(results) > 1 else results[0], indent=2))
    elif len(results) == 1:
        click.echo(_line(results[0]))
    else:
        click.echo(transfers.markdown(table), nl=False)
    if any(r["other_weights"] for r in results):
        click.echo("* trained on weights the ticket was not found from (--force)", err=True)


def _line(result: dict[str, Any]) -> str:
    """One transfer's result in a line: its score and the fraction of dense it holds."""
    fraction = result["fraction_of_dense"]
    several = len(result.get("scores", [])) > 1
    return (
        f"{result['task']} {result['metric']}: {result['score']:.4f}"
        + (f" ± {result['std']:.4f} ({len(result['scores'])} seeds)" if several else "")
        + " at "
        f"{percent(result['sparsity'])} sparsity, "
        f"{'n/a' if fraction is None else percent(fraction)} of dense "
        f"({result['dense_score']:.4f})"
        + (f", LoRA r{result['lora']['rank']}" if "lora" in result else "")
        + (" *" if result["other_weights"] else "")
    )
