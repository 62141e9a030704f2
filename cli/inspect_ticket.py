"""`vlprune inspect`: print one ticket's metadata and sparsity, overall and per tensor.

(Not named inspect.py: on sys.path, as cli/ is when a file in it runs as a script, that name
would hide the standard library's inspect.)"""

from __future__ import annotations

import json
from pathlib import Path

import click

from vl_prune_cli.output import percent, table


@click.command("inspect")
@click.argument("ticket", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print machine-readable JSON; for a broken ticket {"valid": false, "problems": [...]}.',
)
def inspect_ticket(ticket: Path, as_json: bool) -> None:
    """Show a ticket's metadata and its overall and per-tensor sparsity.

    A broken ticket is refused as applying it would refuse it, in one line on stderr with exit
    code 2: a tensor whose shape is not the one its `shapes` metadata gives, a tensor missing
    from `shapes` or listed there but not stored, padding bits set, metadata that is not JSON.
    (Whether the tensors fit a model is checked when the ticket is applied to one.)"""
    from vl_prune.errors import VLPruneError
    from vl_prune.ticket import Ticket

    try:
        loaded = Ticket.load(ticket)
    except VLPruneError as exc:
        if as_json:
            click.echo(json.dumps({"path": str(ticket), "valid": False, "problems": [str(exc)]}))
        raise
    layers = loaded.layer_sparsity()
    if as_json:
        out = {
            "path": str(ticket),
            "valid": True,
            "metadata": loaded.metadata,
            "weights": loaded.total,
            "pruned": loaded.pruned,
            "sparsity": loaded.sparsity,
            "tensors": {
                name: {"shape": list(mask.shape), "weights": mask.numel(), "sparsity": layers[name]}
                for name, mask in loaded.masks.items()
            },
        }
        click.echo(json.dumps(out, indent=2))
        return
    skip = {"shapes", "history", "sparsity"}
    meta = [[k, str(v)] for k, v in sorted(loaded.metadata.items()) if k not in skip]
    rounds = len(loaded.metadata.get("history") or [])
    meta.append(["history", f"{rounds} round{'s' if rounds != 1 else ''}"])
    meta.append(
        [
            "sparsity",
            f"{percent(loaded.sparsity)} ({loaded.pruned:,} of {loaded.total:,} weights pruned)",
        ]
    )
    click.echo(str(ticket))
    click.echo("\n".join("  " + line for line in table(["key", "value"], meta).splitlines()[1:]))
    click.echo()
    rows = [
        [name, "x".join(map(str, mask.shape)), f"{mask.numel():,}", percent(layers[name])]
        for name, mask in loaded.masks.items()
    ]
    click.echo(table(["tensor", "shape", "weights", "pruned"], rows, right=(2, 3)))
