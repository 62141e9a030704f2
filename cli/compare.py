"""`vlprune compare`: print (and draw) how much two or more tickets' kept weights overlap."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from vl_prune_cli.errors import UserError
from vl_prune_cli.output import table


@click.command()
@click.argument("tickets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--plot", type=click.Path(path_type=Path), help="Also write the IoU matrix as a heatmap PNG."
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def compare(tickets: tuple[Path, ...], plot: Path | None, as_json: bool) -> None:
    """Pairwise overlap (IoU of kept weights) of two or more tickets."""
    from vl_prune.ticket import Ticket

    if len(tickets) < 2:
        raise UserError("compare needs at least two tickets")
    loaded = [Ticket.load(path) for path in tickets]
    matrix = [[a.iou(b) for b in loaded] for a in loaded]
    labels = _labels(tickets)
    if plot is not None:
        from vl_prune.plots import iou_heatmap

        iou_heatmap(matrix, labels, plot)
    if as_json:
        out = {"tickets": [str(p) for p in tickets], "labels": labels, "iou": matrix}
        click.echo(json.dumps(out, indent=2))
        return
    rows = [[label, *(f"{x:.3f}" for x in row)] for label, row in zip(labels, matrix, strict=True)]
    right = range(1, len(labels) + 1)
    click.echo(table(["IoU", *labels], rows, right=right))
    if plot is not None:
        click.echo(f"heatmap written to {plot}")


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short names for tickets: file stems, or the full paths where stems collide."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
