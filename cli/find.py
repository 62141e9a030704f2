"""`vlprune find`: find a ticket by pruning rounds, and print the run's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vl_prune_cli.options import (
    FiniteRange,
    adversarial_options,
    check_names,
    find_settings,
    model_option,
    new_file,
    runs_option,
    training_options,
    weights_and_data_options,
    writable_folder,
)
from vl_prune_cli.output import percent, progress, table


@click.command()
@model_option
@weights_and_data_options
@click.option("--task", required=True, help="Task plugin to find the ticket on.")
@click.option(
    "--method",
    default="imp",
    show_default=True,
    help="Mask rule: imp, random, layerwise, structured, …; or rewind, oneshot, adv-imp: imp run "
    "that way (see `vlprune list methods`).",
)
@click.option(
    "--schedule",
    type=click.Choice(["linear", "geometric"]),
    default="linear",
    show_default=True,
    help="linear: 10%, 20%, … of the weights; geometric: --rate of the survivors each round.",
)
@click.option(
    "--rate",
    type=FiniteRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Geometric schedule's rate.",
)
@click.option(
    "--sparsity",
    type=FiniteRange(0, 1, min_open=True, max_open=True),
    default=0.9,
    show_default=True,
    help="Final sparsity.",
)
@click.option(
    "--rewind-step",
    type=click.IntRange(min=1),
    help="Rewind survivors to the dense run's weights after this step (any method; rewind: "
    "required).",
)
@click.option(
    "--one-shot",
    is_flag=True,
    help="Cut every sparsity at once from the dense-trained weights (any method; oneshot: "
    "implied).",
)
@click.option(
    "--keep",
    type=FiniteRange(0, 1, min_open=True),
    default=0.99,
    show_default=True,
    help="The ticket kept is the sparsest round holding this fraction of dense.",
)
@click.option(
    "--stop-below",
    type=FiniteRange(0, 1, min_open=True),
    help="End the schedule after the first round whose mean score falls below this fraction "
    "of dense (the curve has broken); the run goes on from there without it.",
)
@training_options
@adversarial_options
@runs_option
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Save the training state every N steps (resume point).",
)
@click.option("--out", type=click.Path(path_type=Path), help="Also copy the final ticket here.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def find(
    backbone: str,
    preset: str | None,
    checkpoint: str | None,
    tokenizer: str | None,
    data: str | None,
    task: str,
    method: str,
    schedule: str,
    rate: float,
    sparsity: float,
    rewind_step: int | None,
    one_shot: bool,
    keep: float,
    stop_below: float | None,
    runs: Path,
    checkpoint_every: int,
    out: Path | None,
    quiet: bool,
    as_json: bool,
    **training: Any,
) -> None:
    """Find a ticket: IMP rounds (or a baseline) to --sparsity, resumable, with a report."""
    check_names(backbones=backbone, tasks=task, methods=method)
    new_file("--out", out)
    writable_folder("--runs", runs)
    from vl_prune.distributed import process_state
    from vl_prune.lottery import Lottery
    from vl_prune.pruning.aliases import resolve

    _, alias = resolve(method)
    settings = find_settings(
        task,
        backbone,
        training,
        data=data,
        implied=alias is not None and alias.adversarial,
        method=method,
        preset=preset,
        checkpoint=checkpoint,
        tokenizer=tokenizer,
        schedule=schedule,
        rate=rate,
        sparsity=sparsity,
        rewind_step=rewind_step,
        one_shot=one_shot,
    )
    main_process = process_state().is_main_process  # one job: one process writes and prints
    say = progress(quiet)
    lottery = Lottery(settings, runs=runs, checkpoint_every=checkpoint_every, quiet=quiet, log=say)
    say(f"run folder: {lottery.folder}")
    report = lottery.run(keep=keep, stop_below=stop_below)
    if not main_process:
        return
    if out is not None:
        from vl_prune.files import atomic_write

        atomic_write(out, Path(report["final"]["ticket"]).read_bytes())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    several = len(report["seeds"]) > 1
    rows = [
        [
            str(r["round"]),
            percent(r["sparsity"]),
            f"{r['score']:.4f}" + (f" ± {r['std']:.4f}" if several else ""),
            percent(r["fraction_of_dense"]),
        ]
        for r in report["rounds"]
    ]
    metric = report["metric"] + (f" (mean ± std, {len(report['seeds'])} seeds)" if several else "")
    click.echo(table(["round", "sparsity", metric, "of dense"], rows, right=(0, 1, 2, 3)))
    if report["stopped_early"]:
        click.echo(
            f"stopped after round {report['rounds'][-1]['round']}: below --stop-below "
            f"{stop_below:g} of dense, short of --sparsity {percent(sparsity)}"
        )
    final = report["final"]
    click.echo(
        f"ticket: {final['ticket']} (round {final['round']}, {percent(final['sparsity'])} sparse, "
        f"{percent(final['fraction_of_dense'])} of dense)"
        + (f", copied to {out}" if out is not None else "")
    )
    click.echo(f"report: {lottery.folder / 'report.json'}  curve: {lottery.folder / 'curve.png'}")
