"""`vlprune plot`: draw score against sparsity from finished runs' reports."""

from __future__ import annotations

from pathlib import Path

import click

from vl_prune_cli.errors import UserError


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("curves.png"),
    show_default=True,
    help="PNG to write.",
)
def plot(runs: tuple[Path, ...], out: Path) -> None:
    """Score against sparsity for one or more run folders (e.g. imp against random)."""
    from vl_prune.data.text import read_json
    from vl_prune.plots import check_report, curves

    reports = []
    for run in runs:
        path = run / "report.json" if run.is_dir() else run
        if not path.is_file():
            raise UserError(f"{run}: no report.json (is it a finished run folder?)")
        reports.append(read_json(path))
        check_report(reports[-1], str(path))
    curves(reports, out)
    click.echo(f"wrote {out}")
