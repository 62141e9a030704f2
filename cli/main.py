"""The `vlprune` command: its group, the --debug flag, and the commands it holds."""

from __future__ import annotations

import sys

import click

from vl_prune import __version__
from vl_prune_cli.compare import compare
from vl_prune_cli.data import data
from vl_prune_cli.errors import Group
from vl_prune_cli.evaluate import evaluate
from vl_prune_cli.find import find
from vl_prune_cli.inspect_ticket import inspect_ticket
from vl_prune_cli.plot import plot
from vl_prune_cli.plugins import check_plugin, list_plugins
from vl_prune_cli.runs import runs
from vl_prune_cli.transfer import transfer


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlprune")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find, inspect and compare lottery tickets in vision-and-language transformers."""
    ctx.obj = {"debug": debug}


for command in (
    list_plugins,
    check_plugin,
    data,
    find,
    evaluate,
    transfer,
    plot,
    inspect_ticket,
    compare,
    runs,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="vlprune")


if __name__ == "__main__":
    sys.exit(main())
