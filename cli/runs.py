"""`vlprune runs clean`: free what killed runs and builds left in run folders and the cache."""

from __future__ import annotations

from pathlib import Path

import click

from vl_prune_cli.errors import Group, UserError
from vl_prune_cli.options import runs_option
from vl_prune_cli.output import table


@click.group(cls=Group)
def runs() -> None:
    """Run folders: free what killed runs left behind."""


@runs.command("clean")
@runs_option
@click.option("--dry-run", is_flag=True, help="List what would go; delete nothing.")
@click.option(
    "--resume-points",
    is_flag=True,
    help="Also delete the training state of unfinished rounds (they then train from their "
    "first step).",
)
def runs_clean(runs: Path, dry_run: bool, resume_points: bool) -> None:
    """Delete temporary files, the training state of finished rounds, older saves, stale locks
    and partial cache builds; run folders in use by a running process are left alone."""
    from vl_prune import cleanup
    from vl_prune.home import home
    from vl_prune.locks import owner

    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs {runs}: is a file, not a folder")
    found = cleanup.cache_leftovers(home())
    if runs.is_dir():
        found += cleanup.stale_locks(runs)
        for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
            if (user := owner(folder)) is not None:
                click.echo(f"skipped {folder}: in use by {user}", err=True)
            elif folder.name == "transfer":
                found += cleanup.transfer_leftovers(folder)
            elif (folder / "config.json").is_file():
                found += cleanup.run_leftovers(folder, resume_points)
    sizes = [leftover.size for leftover in found]
    if found:
        rows = [[str(f.path), _mb(size), f.why] for f, size in zip(found, sizes, strict=True)]
        click.echo(table(["path", "size", "what"], rows, right=(1,)))
    if not dry_run:
        for leftover in found:
            leftover.remove()
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {_mb(sum(sizes))} in {len(found)} leftovers")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
