"""`vlprune runs clean`: free what killed runs and builds left in run folders and the cache."""

from __future__ import annotations

from contextlib import nullcontext
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
    from vl_prune.locks import Busy, locked, owner

    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs {runs}: is a file, not a folder")
    freed: list[tuple[cleanup.Leftover, int]] = []

    def take(leftovers: list[cleanup.Leftover]) -> None:
        for leftover in leftovers:
            freed.append((leftover, leftover.size))
            if not dry_run:
                leftover.remove()

    take(cleanup.cache_leftovers(home()))
    if runs.is_dir():
        take(cleanup.stale_locks(runs))
        take(cleanup.transfer_leftovers(runs / "transfer") + cleanup.stale_locks(runs / "transfer"))
        take(cleanup.stale_locks(runs / "dense"))
        # Shared dense rounds (runs/dense/) are laid out as runs of one round.
        shared = (runs / "dense").iterdir() if (runs / "dense").is_dir() else ()
        candidates = [*runs.iterdir(), *shared]
        for folder in sorted(p for p in candidates if (p / "config.json").is_file()):
            try:
                # Held while its leftovers are found and removed: a run starting meanwhile
                # waits, and none of its files can go.
                with nullcontext() if dry_run else locked(folder, wait=False):
                    if dry_run and (user := owner(folder)) is not None:
                        raise Busy(f"{folder} is in use by {user}")
                    take(cleanup.run_leftovers(folder, resume_points))
            except Busy as busy:
                click.echo(f"skipped: {busy}", err=True)
    if freed:
        rows = [[str(leftover.path), _mb(size), leftover.why] for leftover, size in freed]
        click.echo(table(["path", "size", "what"], rows, right=(1,)))
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {_mb(sum(size for _, size in freed))} in {len(freed)} leftovers")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
