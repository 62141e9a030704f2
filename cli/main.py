"""The `vlprune` command: its group, the --debug flag, and the commands it holds."""

from __future__ import annotations

import os
import sys

import click

from vl_prune import __version__
from vl_prune_cli.compare import compare
from vl_prune_cli.data import data
from vl_prune_cli.errors import Group
from vl_prune_cli.evaluate import evaluate
from vl_prune_cli.export import export
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
    export,
    transfer,
    plot,
    inspect_ticket,
    compare,
    runs,
):
    cli.add_command(command)


#: OpenMP threads (libgomp, torch's on Linux) that wait this many spins before sleeping. By
#: default they spin ~300,000 times between torch's many small parallel regions, i.e. always:
#: two jobs on one machine then spend it spinning against each other (a short find on 2
#: cores: 14 s alone, 240 s each when two ran together). At 5,000: 15-16 s alone, 34 s each
#: for two together (benchmarks/bench_find.py --pair).
SPIN_COUNT = "5000"


def main() -> None:
    # Read once, when torch loads OpenMP; the user's own OpenMP wait settings win.
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    cli(prog_name="vlprune")


if __name__ == "__main__":
    sys.exit(main())
