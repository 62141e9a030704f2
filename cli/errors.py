"""How a failure reaches the user: one line on stderr and exit code 2, unless --debug is given.

click's own handling is replaced where it would print more or mislead: its usage errors take
three lines, and it reports an EOFError or KeyboardInterrupt as "Aborted!" (it takes an EOFError
for the end of stdin, which no command here reads: an EOFError is a file that ended early)."""

from __future__ import annotations

import sys
import traceback

import click
from click.exceptions import NoArgsIsHelpError

from vl_prune.errors import VLPruneError

#: commands whose work survives an interrupt (the same command again goes on from it): what
#: they keep
RESUMABLE = {
    "find": "finished rounds and checkpoints are kept",
    "transfer": "finished cells are kept",
}


class UserError(click.ClickException):
    """Bad input: one line on stderr and exit code 2 (click's code for usage errors)."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"vlprune: error: {self.message}", err=True)


class Interrupted(click.ClickException):
    """Ctrl-C: one line saying what is kept, and the shell's code for SIGINT."""

    exit_code = 130

    def show(self, file=None) -> None:
        # A terminal has echoed ^C: start on a line of our own.
        start = "\n" if sys.stderr.isatty() else ""
        click.echo(f"{start}vlprune: {self.message}", err=True)


def usage_error(exc: click.UsageError) -> UserError:
    """click's usage error as one line, with the command whose help says more."""
    message = " ".join(exc.format_message().split()).removesuffix(".")
    command = exc.ctx.command_path if exc.ctx is not None else "vlprune"
    return UserError(f"{message} (see `{command} -h`)")


class Group(click.Group):
    """Turns library errors about user input into one-line errors, unless --debug is given; the
    errors of its subcommands and of groups under it too."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        # The group's own options and arguments are parsed here, before `invoke`.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except NoArgsIsHelpError:
            raise  # a group called without a command: its help, as click shows it
        except click.UsageError as exc:
            raise usage_error(exc) from exc

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise usage_error(exc) from exc  # a subcommand's, or an unknown subcommand
        except (VLPruneError, OSError) as exc:
            # OSError here is a file the user named: unreadable, missing folder, disk full.
            if _debug(ctx):
                raise
            raise UserError(" ".join(str(exc).split())) from exc
        except EOFError as exc:
            # Every reader names the file that ended; this is the last resort.
            if _debug(ctx):
                traceback.print_exc()
            detail = f": {exc}" if str(exc) else ""
            raise UserError(f"a file ended early (EOFError{detail}); --debug shows which") from exc
        except KeyboardInterrupt as exc:
            if _debug(ctx):
                traceback.print_exc()
            message = "interrupted"
            if kept := RESUMABLE.get(ctx.invoked_subcommand):
                message += f"; run the same command again to resume ({kept})"
            raise Interrupted(message) from exc


def _debug(ctx: click.Context) -> bool:
    """Whether --debug was given (known once the group's callback has run)."""
    return bool(ctx.obj and ctx.obj.get("debug"))
