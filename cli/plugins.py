"""`vlprune list` and `vlprune check-plugin`: which plugins are installed, and whether one meets
its contract."""

from __future__ import annotations

import json

import click

from vl_prune import registry
from vl_prune_cli.output import table

# Extra columns per kind: (header, attribute of the loaded plugin).
_DETAILS = {
    "backbones": [("presets", "presets"), ("input", "image_input")],
    "tasks": [("metric", "metric")],
}


def _detail(row: registry.Listing, attribute: str) -> str:
    value = getattr(row.loaded, attribute, "")
    return ", ".join(value) if isinstance(value, tuple | list) else str(value or "")


@click.command("list")
@click.argument("kind", required=False, type=click.Choice(registry.KINDS))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_plugins(kind: str | None, as_json: bool) -> None:
    """List installed backbones, tasks, pruning methods, worlds and world splits, and who
    provides them."""
    kinds = [kind] if kind else list(registry.KINDS)
    listings = {k: registry.listing(k) for k in kinds}
    if as_json:
        out = {
            k: [
                {
                    "name": row.plugin.name,
                    "distribution": row.plugin.distribution,
                    "target": row.plugin.target,
                    "description": row.description,
                    **{header: _detail(row, attr) for header, attr in _DETAILS.get(k, [])},
                    "error": row.error,
                }
                for row in rows
            ]
            for k, rows in listings.items()
        }
        click.echo(json.dumps(out, indent=2))
        return
    for i, (k, rows) in enumerate(listings.items()):
        if i:
            click.echo()
        click.echo(f"{k}:")
        if not rows:
            click.echo("  (none installed)")
            continue
        details = _DETAILS.get(k, [])
        lines = table(
            ["name", "provided by", *(header for header, _ in details), "description"],
            [
                [
                    row.plugin.name,
                    row.plugin.distribution,
                    *(_detail(row, attr) for _, attr in details),
                    row.description if row.error is None else f"FAILED TO LOAD: {row.error}",
                ]
                for row in rows
            ],
        )
        click.echo("\n".join("  " + line for line in lines.splitlines()))


@click.command("check-plugin")
@click.argument("name")
@click.option(
    "--kind",
    type=click.Choice(["backbones", "tasks", "methods"]),
    help="The plugin's kind, where NAME names plugins of several kinds.",
)
def check_plugin(name: str, kind: str | None) -> None:
    """Check a backbone, task or method plugin against its contract, as its first use does."""
    from vl_prune.contract import load_checked, locate

    plugin = locate(name, kind)
    load_checked(plugin.kind, plugin.name)
    click.echo(
        f"ok: {plugin.kind[:-1]} {plugin.name!r} (from {plugin.distribution}) meets the contract"
    )
