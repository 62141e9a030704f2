"""`vlprune export`: a ticket with θ0 or fine-tuned weights as files others use."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vl_prune_cli.errors import UserError
from vl_prune_cli.options import check_names, new_file, ticket_model_option
from vl_prune_cli.output import progress


@click.command("export")
@click.argument("ticket", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="The file to write (.safetensors); a new folder for --format transformers.",
)
@click.option(
    "--format",
    "layout",
    type=click.Choice(["plain", "compressed", "transformers"]),
    default="plain",
    show_default=True,
    help="plain: a state dict, pruned entries zero; compressed: the packed masks and only the "
    "kept values; transformers: a save_pretrained folder (lxmert, vilt).",
)
@click.option(
    "--shrink",
    is_flag=True,
    help="Remove the heads and neurons the ticket cuts whole: a smaller dense model with the "
    "same outputs (a structured ticket's; plain format).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Floating-point type of the stored values (plain and compressed).",
)
@click.option(
    "--finetuned",
    type=click.Path(path_type=Path),
    help="Fine-tuned weights (backbone.* and head.*, as `vlprune evaluate --save` writes) "
    "[the ticket's θ0].",
)
@ticket_model_option
@click.option("--checkpoint", help="θ0: the pre-trained weights the ticket was found from.")
@click.option("--force", is_flag=True, help="Export a ticket found from other weights anyway.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export(
    ticket: Path,
    out: Path,
    layout: str,
    shrink: bool,
    dtype: str,
    finetuned: Path | None,
    backbone: str | None,
    checkpoint: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a ticket with its weights as a plain or compressed state dict, a transformers
    folder, or a model shrunk to the heads and neurons it keeps."""
    check_names(backbones=backbone)
    if layout == "transformers":
        if shrink:
            raise UserError(
                "--shrink gives every layer its own width, which a transformers config cannot "
                "hold: export it with --format plain"
            )
        if dtype != "float32":
            raise UserError("--dtype applies to plain and compressed exports")
        if out.exists():
            raise UserError(f"--out {out}: exists; give a new folder")
        if not out.absolute().parent.is_dir():
            raise UserError(f"--out {out}: folder {out.absolute().parent} does not exist")
    else:
        new_file("--out", out)
    if shrink and layout == "compressed":
        raise UserError("--shrink writes a smaller dense model: use --format plain")
    from vl_prune.export import export as write
    from vl_prune.export import export_transformers, pruned_backbone
    from vl_prune.retrain import ticket_backbone
    from vl_prune.ticket import Ticket

    loaded = Ticket.load(ticket)
    name = ticket_backbone([loaded], backbone)
    if name is None:
        raise UserError(f"{ticket}: the ticket does not say its backbone: pass --model")
    model, head = pruned_backbone(loaded, name, checkpoint, finetuned, force)
    if layout == "transformers":
        export_transformers(model, out, log=progress(False))
        written = {"path": str(out), "format": layout, "bytes": _size(out)}
        if head:
            progress(False)(
                f"the head's {len(head)} tensors are not part of a transformers folder; "
                "--format plain keeps them"
            )
    else:
        stored = "shrunk" if shrink else layout
        write(model, name, out, stored, dtype, head, loaded)
        written = {"path": str(out), "format": stored, "dtype": dtype, "bytes": _size(out)}
    written["sparsity"] = loaded.sparsity
    if as_json:
        click.echo(json.dumps(written, indent=2))
        return
    click.echo(
        f"wrote {written['path']} ({written['format']}, {written['bytes'] / 1e6:.1f} MB) for a "
        f"ticket at {loaded.sparsity:.1%} sparsity"
    )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
