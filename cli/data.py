"""`vlprune data world`: write the embedded world's split of a task to disk."""

from __future__ import annotations

from pathlib import Path

import click

from vl_prune_cli.errors import Group


@click.group(cls=Group)
def data() -> None:
    """Data sets: write the embedded world's splits to disk."""


@data.command("world")
@click.option("--task", "task_name", required=True, help="Task whose split to write (e.g. nlvr2).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="World seed.")
def data_world(task_name: str, out: Path, seed: int) -> None:
    """Write the embedded world's split of a task in its official layout."""
    from vl_prune.files import write_folder
    from vl_prune.world import embedded_world

    split = embedded_world().split(task_name)
    write_folder(out, lambda folder: split.write(folder, seed))
    files = sum(1 for p in out.rglob("*") if p.is_file())
    click.echo(f"wrote the world's {task_name} split (seed {seed}) to {out}: {files} files")
