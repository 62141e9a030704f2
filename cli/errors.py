"""How a failure reaches the user: one line on stderr and exit code 2, unless --debug is given."""

from __future__ import annotations

import click

from vl_prune.errors import VLPruneError


class UserError(click.ClickException):
    """Bad input: one line on stderr and exit code 2 (click's code for usage errors)."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"vlprune: error: {self.message}", err=True)


class Group(click.Group):
    """Turns library errors about user input into one-line errors, unless --debug is given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (VLPruneError, OSError) as exc:
            # OSError here is a file the user named: unreadable, missing folder, disk full.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise UserError(" ".join(str(exc).split())) from exc
