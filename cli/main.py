"""The `vlprune` command: parse arguments, call vl_prune, print results."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from vl_prune import __version__, registry
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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlprune")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find, inspect and compare lottery tickets in vision-and-language transformers."""
    ctx.obj = {"debug": debug}


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in [headers, *rows]:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# Extra columns per kind: (header, attribute of the loaded plugin).
_DETAILS = {
    "backbones": [("presets", "presets"), ("input", "image_input")],
    "tasks": [("metric", "metric")],
}


def _detail(row: registry.Listing, attribute: str) -> str:
    value = getattr(row.loaded, attribute, "")
    return ", ".join(value) if isinstance(value, tuple | list) else str(value or "")


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(registry.KINDS))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_plugins(kind: str | None, as_json: bool) -> None:
    """List installed backbones, tasks and pruning methods, and who provides them."""
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
        table = _table(
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
        click.echo("\n".join("  " + line for line in table.splitlines()))


@cli.group()
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


def _options(*options):
    """One decorator applying several click options, listed in the order --help shows them."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# Fine-tuning flags shared by find, evaluate and transfer; unset ones come from the task's recipe.
_training_options = _options(
    click.option("--steps", type=int, help="Optimizer steps per fine-tuning."),
    click.option("--lr", type=float, help="Peak learning rate (linear warmup and decay)."),
    click.option("--batch-size", type=int, help="Examples per step and process."),
    click.option("--grad-accumulation", type=int, help="Batches per optimizer step."),
    click.option(
        "--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), help="Accelerate's."
    ),
    click.option("--seed", type=int, help="Seed of the head, data order and dropout."),
    click.option(
        "--num-workers",
        type=int,
        help="Processes that read and collate batches [0 on CPU, up to 4 per GPU]; "
        "results do not depend on it.",
    ),
)

DEFAULT_BACKBONE = "uniter"
_model_option = click.option(
    "--model",
    "backbone",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="Backbone plugin (see `vlprune list backbones`).",
)
# evaluate and transfer train a ticket: on its own backbone unless told otherwise.
_ticket_model_option = click.option(
    "--model",
    "backbone",
    help=f"Backbone plugin [the ticket's backbone, else {DEFAULT_BACKBONE}]; a ticket found on "
    "another backbone is refused.",
)

# Which weights and data: find, evaluate and transfer.
_model_options = _options(
    click.option("--preset", help="Backbone preset; with --checkpoint, the checkpoint's."),
    click.option("--checkpoint", help="Pre-trained weights: a file, folder or hub id."),
    click.option(
        "--tokenizer",
        help="The checkpoint's tokenizer: a local folder or vocab.txt [beside the checkpoint, "
        "else the hub].",
    ),
    click.option(
        "--data",
        help="Task data folder: official annotation files, or UNITER's txt_db/ + img_db/ "
        "(default: the embedded world).",
    ),
    click.option("--train-split", help="Split to train on, e.g. train2014 [found in --data]."),
    click.option("--eval-split", help="Split to score on, e.g. val2014 [found in --data]."),
    click.option(
        "--max-text-len", type=int, help="Longest text in tokens [UNITER's: 60, VCR 220]."
    ),
    click.option(
        "--answer-vocab",
        help="Answers of VQA/GQA heads: UNITER's or LXMERT's ans2label.json [from the data].",
    ),
)


# Adversarial fine-tuning (VILLA): find, evaluate and transfer.
_adversarial_options = _options(
    click.option(
        "--adversarial", is_flag=True, help="Fine-tune adversarially (VILLA); adv-imp implies it."
    ),
    click.option("--adv-steps", type=int, help="Ascent steps per training step [3]."),
    click.option("--adv-lr", type=float, help="Size of each ascent step (L2) [1e-3]."),
    click.option("--adv-max-norm", type=float, help="Bound on each perturbation's L2 norm [none]."),
    click.option("--adv-kl", type=float, help="Weight of the clean/perturbed KL term [1.5]."),
    click.option(
        "--adv-modality",
        type=click.Choice(["text", "image", "both"]),
        help="What is perturbed [both].",
    ),
)

_ADVERSARIAL_FLAGS = ("adv_steps", "adv_lr", "adv_max_norm", "adv_kl", "adv_modality")


def _adversarial(training: dict, implied: bool = False):
    """Pop the adversarial flags out of `training`; AdversarialSettings if asked for, else None."""
    from vl_prune.adversarial import AdversarialSettings

    wanted = training.pop("adversarial") or implied
    given = {k.removeprefix("adv_"): training.pop(k) for k in _ADVERSARIAL_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if given and not wanted:
        flag = "--adv-" + next(iter(given)).replace("_", "-")
        raise UserError(f"{flag} needs --adversarial (or an adversarial method such as adv-imp)")
    return AdversarialSettings(**given) if wanted else None


_runs_option = click.option(
    "--runs",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Folder of run folders (transfer keeps its results in its transfer/).",
)


def _settings(
    task: str, backbone: str, training: dict, data: str | None, implied: bool = False, **extra
):
    """FindSettings from the flags; training flags left unset come from the task's recipe.
    `implied`: the method fine-tunes adversarially whether --adversarial is given or not."""
    from dataclasses import fields, replace

    from vl_prune.experiment import FindSettings, recipe
    from vl_prune.task import DataOptions

    training = dict(training)
    names = [f.name for f in fields(DataOptions)]
    options = DataOptions(**{name: training.pop(name) for name in names})
    if data is None and options != DataOptions():
        flag = next(name for name in names if getattr(options, name) is not None)
        raise UserError(f"--{flag.replace('_', '-')} describes --data; the world has its own")
    adversarial = _adversarial(training, implied)
    given = {k: v for k, v in training.items() if v is not None}
    train = replace(recipe(task, world=data is None), **given, adversarial=adversarial)
    return FindSettings(
        backbone=backbone, task=task, data=data, train=train, data_options=options, **extra
    )


@cli.command()
@_model_option
@_model_options
@click.option("--task", required=True, help="Task plugin to find the ticket on.")
@click.option(
    "--method",
    default="imp",
    show_default=True,
    help="Mask rule: imp, random, layerwise, …; or rewind, oneshot, adv-imp: imp run that way "
    "(see `vlprune list methods`).",
)
@click.option(
    "--schedule",
    type=click.Choice(["linear", "geometric"]),
    default="linear",
    show_default=True,
    help="linear: 10%, 20%, … of the weights; geometric: --rate of the survivors each round.",
)
@click.option(
    "--rate", type=float, default=0.2, show_default=True, help="Geometric schedule's rate."
)
@click.option("--sparsity", type=float, default=0.9, show_default=True, help="Final sparsity.")
@click.option(
    "--rewind-step",
    type=int,
    help="Rewind survivors to the dense run's weights after this step (any method; rewind: "
    "required).",
)
@click.option(
    "--one-shot",
    is_flag=True,
    help="Cut every sparsity at once from the dense-trained weights (any method; oneshot: "
    "implied).",
)
@click.option(
    "--keep",
    type=float,
    default=0.99,
    show_default=True,
    help="The ticket kept is the sparsest round holding this fraction of dense.",
)
@_training_options
@_adversarial_options
@_runs_option
@click.option(
    "--checkpoint-every",
    type=int,
    default=50,
    show_default=True,
    help="Save the training state every N steps (resume point).",
)
@click.option("--out", type=click.Path(path_type=Path), help="Also copy the final ticket here.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def find(
    backbone,
    preset,
    checkpoint,
    tokenizer,
    data,
    task,
    method,
    schedule,
    rate,
    sparsity,
    rewind_step,
    one_shot,
    keep,
    runs,
    checkpoint_every,
    out,
    quiet,
    as_json,
    **training,
) -> None:
    """Find a ticket: IMP rounds (or a baseline) to --sparsity, resumable, with a report."""
    from vl_prune.distributed import process_state
    from vl_prune.lottery import Lottery
    from vl_prune.pruning.aliases import resolve

    _, alias = resolve(method)
    settings = _settings(
        task,
        backbone,
        training,
        data=data,
        implied=alias is not None and alias.adversarial,
        method=method,
        preset=preset,
        checkpoint=checkpoint,
        tokenizer=tokenizer,
        schedule=schedule,
        rate=rate,
        sparsity=sparsity,
        rewind_step=rewind_step,
        one_shot=one_shot,
    )
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    main_process = process_state().is_main_process  # one job: one process writes and prints
    say = _say(quiet)
    lottery = Lottery(settings, runs=runs, checkpoint_every=checkpoint_every, quiet=quiet, log=say)
    say(f"run folder: {lottery.folder}")
    report = lottery.run(keep=keep)
    if not main_process:
        return
    if out is not None:
        from vl_prune.files import atomic_write

        atomic_write(out, Path(report["final"]["ticket"]).read_bytes())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    rows = [
        [
            str(r["round"]),
            _percent(r["sparsity"]),
            f"{r['score']:.4f}",
            _percent(r["fraction_of_dense"]),
        ]
        for r in report["rounds"]
    ]
    click.echo(
        _table(["round", "sparsity", report["metric"], "of dense"], rows, right=(0, 1, 2, 3))
    )
    final = report["final"]
    click.echo(
        f"ticket: {final['ticket']} (round {final['round']}, {_percent(final['sparsity'])} sparse, "
        f"{_percent(final['fraction_of_dense'])} of dense)"
        + (f", copied to {out}" if out is not None else "")
    )
    click.echo(f"report: {lottery.folder / 'report.json'}  curve: {lottery.folder / 'curve.png'}")


@cli.command("evaluate")
@click.option("--ticket", type=click.Path(path_type=Path), help="Ticket to train and score.")
@click.option("--task", required=True, help="Task plugin to score on.")
@_ticket_model_option
@_model_options
@_training_options
@_adversarial_options
@click.option(
    "--finetuned",
    type=click.Path(path_type=Path),
    help="Score these fine-tuned weights (backbone.* and head.*) instead of training.",
)
@click.option("--force", is_flag=True, help="Train a ticket found from other weights anyway.")
@click.option(
    "--lora", type=int, help="Train rank-R LoRA adapters over the frozen masked backbone."
)
@click.option(
    "--adapters",
    type=click.Path(path_type=Path),
    help="New folder for the LoRA adapters (peft format) [beside the ticket].",
)
@click.option(
    "--merge",
    type=click.Path(path_type=Path),
    help="Also merge the adapters, mask kept, and write the weights here (.safetensors).",
)
@click.option(
    "--weights",
    default="theta0",
    show_default=True,
    help="Start from θ0; from θ0 shuffled within each layer (`shuffled`); or from another "
    "pre-trained weights file (e.g. BERT's), its tensors matched by name (baselines).",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate_command(
    ticket,
    task,
    backbone,
    preset,
    checkpoint,
    tokenizer,
    data,
    finetuned,
    force,
    lora,
    adapters,
    merge,
    weights,
    quiet,
    as_json,
    **training,
) -> None:
    """Train a ticket from θ0 on a task and score it (or score fine-tuned weights)."""
    from vl_prune.baselines import NAMED
    from vl_prune.distributed import process_state
    from vl_prune.retrain import Lora, score_finetuned, ticket_backbone, train_ticket
    from vl_prune.ticket import Ticket

    if lora is None and (adapters is not None or merge is not None):
        raise UserError(f"{'--adapters' if adapters is not None else '--merge'} needs --lora R")
    if lora is not None and ticket is None:
        raise UserError("--lora trains adapters over a ticket: give --ticket")
    loaded = Ticket.load(ticket) if ticket is not None else None
    if loaded is not None:
        backbone = ticket_backbone(loaded, backbone)
    backbone = backbone or DEFAULT_BACKBONE
    settings = _settings(
        task,
        backbone,
        training,
        data=data,
        preset=preset,
        checkpoint=checkpoint,
        tokenizer=tokenizer,
    )
    if finetuned is not None and (weights != "theta0" or settings.train.adversarial):
        flag = "--weights" if weights != "theta0" else "--adversarial"
        raise UserError(f"{flag} chooses how to train; --finetuned trains nothing")
    if finetuned is not None and lora is not None:
        raise UserError("--lora chooses how to train; --finetuned trains nothing")
    if weights not in NAMED and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: no such file (give {', '.join(NAMED)} or a file)")
    say = _say(quiet)
    if finetuned is not None:
        result = score_finetuned(loaded, finetuned, settings, log=say)
    elif loaded is None:
        raise UserError("evaluate needs --ticket (to train) or --finetuned (to score)")
    else:
        options = None if lora is None else Lora.beside(lora, ticket, task, adapters, merge)
        result = train_ticket(
            loaded, settings, force=force, quiet=quiet, weights=weights, lora=options, log=say
        )
    if not process_state().is_main_process:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{result['task']} {result['metric']}: {result['score']:.4f} at "
        f"{_percent(result['sparsity'])} sparsity"
        + _start(result)
        + (" (adversarial)" if settings.train.adversarial else "")
        + (f" with LoRA r{result['lora']['rank']}" if "lora" in result else "")
    )
    if "lora" in result:
        click.echo(f"adapters: {result['lora']['adapters']}")
        merged = result["lora"].get("merge")
        if merged is not None:
            click.echo(merged["report"])
            click.echo(
                f"merged {result['metric']}: {merged['score']:.4f} "
                f"(with adapters {merged['score_before']:.4f}); weights: {merged['path']}"
            )


def _say(quiet: bool):
    """Progress lines on stderr: from the main process only, none with --quiet."""
    from vl_prune.distributed import process_state

    if quiet or not process_state().is_main_process:
        return lambda line: None
    return lambda line: click.echo(line, err=True)


def _start(result: dict) -> str:
    """Where training started, when not from θ0."""
    if result.get("weights", "theta0") == "theta0":
        return ""
    if result["weights"] == "shuffled":
        return " from shuffled θ0"
    kept = result["replaced"]["kept"]
    return f" from {result['weights']}" + (f" ({len(kept)} tensors kept from θ0)" if kept else "")


@cli.command()
@click.option(
    "--ticket",
    "sources",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Ticket file or run folder (its pruned rounds); repeat for a table.",
)
@click.option(
    "--task", "tasks", multiple=True, required=True, help="Target task; repeat for a table."
)
@_ticket_model_option
@_model_options
@_training_options
@_adversarial_options
@click.option("--force", is_flag=True, help="Train tickets found from other weights anyway.")
@click.option(
    "--lora",
    type=int,
    help="Train rank-R LoRA adapters over each frozen masked backbone (kept beside each result).",
)
@_runs_option
@click.option(
    "--out", type=click.Path(path_type=Path), help="Folder for transfer.json, .md and .png."
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def transfer(
    sources,
    tasks,
    backbone,
    preset,
    checkpoint,
    tokenizer,
    data,
    force,
    lora,
    runs,
    out,
    quiet,
    as_json,
    **training,
) -> None:
    """Train tickets from θ0 on other tasks and score them against each task's dense model."""
    from vl_prune import transfer as transfers
    from vl_prune.distributed import process_state
    from vl_prune.plots import transfer_heatmap
    from vl_prune.retrain import ticket_backbone
    from vl_prune.ticket import Ticket

    paths = transfers.ticket_paths(sources)
    tasks = list(dict.fromkeys(tasks))
    if data is not None and len(tasks) > 1:
        raise UserError("--data is one task's folder: give a single --task with it")
    main_process = process_state().is_main_process
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: not a folder")
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
    for path in paths:  # every ticket's backbone must be the one all are trained on
        backbone = ticket_backbone(Ticket.load(path), backbone)
    backbone = backbone or DEFAULT_BACKBONE
    say = click.echo if main_process and not quiet and len(paths) * len(tasks) > 1 else None
    results = []
    for task in tasks:
        settings = _settings(
            task,
            backbone,
            training,
            data=data,
            preset=preset,
            checkpoint=checkpoint,
            tokenizer=tokenizer,
        )
        target = transfers.Transfer(settings, runs=runs, quiet=quiet, lora=lora, log=_say(quiet))
        for path in paths:
            results.append(target.run(path, force=force))
            if say is not None:
                say(f"{transfers.label(results[-1])} → {_transfer_line(results[-1])}", err=True)
    if not main_process:
        return
    table = transfers.table(results)
    if out is not None:
        from vl_prune.files import atomic_write

        atomic_write(out / "transfer.json", json.dumps(table, indent=2).encode())
        atomic_write(out / "transfer.md", transfers.markdown(table).encode())
        transfer_heatmap(table, out / "transfer.png")
    if as_json:
        click.echo(json.dumps(table if len(results) > 1 else results[0], indent=2))
    elif len(results) == 1:
        click.echo(_transfer_line(results[0]))
    else:
        click.echo(transfers.markdown(table), nl=False)
    if any(r["other_weights"] for r in results):
        click.echo("* trained on weights the ticket was not found from (--force)", err=True)


def _transfer_line(result: dict) -> str:
    fraction = result["fraction_of_dense"]
    return (
        f"{result['task']} {result['metric']}: {result['score']:.4f} at "
        f"{_percent(result['sparsity'])} sparsity, "
        f"{'n/a' if fraction is None else _percent(fraction)} of dense "
        f"({result['dense_score']:.4f})"
        + (f", LoRA r{result['lora']['rank']}" if "lora" in result else "")
        + (" *" if result["other_weights"] else "")
    )


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("curves.png"),
    show_default=True,
    help="PNG to write.",
)
def plot(runs: tuple[Path, ...], out: Path) -> None:
    """Score against sparsity for one or more run folders (e.g. imp against random)."""
    from vl_prune.plots import curves

    reports = []
    for run in runs:
        path = run / "report.json" if run.is_dir() else run
        if not path.is_file():
            raise UserError(f"{run}: no report.json (is it a finished run folder?)")
        try:
            reports.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg})") from exc
    curves(reports, out)
    click.echo(f"wrote {out}")


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


@cli.command()
@click.argument("ticket", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(ticket: Path, as_json: bool) -> None:
    """Show a ticket's metadata and its overall and per-tensor sparsity."""
    from vl_prune.ticket import Ticket

    loaded = Ticket.load(ticket)
    layers = loaded.layer_sparsity()
    if as_json:
        out = {
            "path": str(ticket),
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
            f"{_percent(loaded.sparsity)} ({loaded.pruned:,} of {loaded.total:,} weights pruned)",
        ]
    )
    click.echo(str(ticket))
    click.echo("\n".join("  " + line for line in _table(["key", "value"], meta).splitlines()[1:]))
    click.echo()
    rows = [
        [name, "x".join(map(str, mask.shape)), f"{mask.numel():,}", _percent(layers[name])]
        for name, mask in loaded.masks.items()
    ]
    click.echo(_table(["tensor", "shape", "weights", "pruned"], rows, right=(2, 3)))


@cli.command()
@click.argument("tickets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--plot", type=click.Path(path_type=Path), help="Also write the IoU matrix as a heatmap PNG."
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def compare(tickets: tuple[Path, ...], plot: Path | None, as_json: bool) -> None:
    """Pairwise overlap (IoU of kept weights) of two or more tickets."""
    from vl_prune.ticket import Ticket

    if len(tickets) < 2:
        raise UserError("compare needs at least two tickets")
    loaded = [Ticket.load(path) for path in tickets]
    matrix = [[a.iou(b) for b in loaded] for a in loaded]
    labels = _labels(tickets)
    if plot is not None:
        from vl_prune.plots import iou_heatmap

        iou_heatmap(matrix, labels, plot)
    if as_json:
        out = {"tickets": [str(p) for p in tickets], "labels": labels, "iou": matrix}
        click.echo(json.dumps(out, indent=2))
        return
    rows = [[label, *(f"{x:.3f}" for x in row)] for label, row in zip(labels, matrix, strict=True)]
    right = range(1, len(labels) + 1)
    click.echo(_table(["IoU", *labels], rows, right=right))
    if plot is not None:
        click.echo(f"heatmap written to {plot}")


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short names for tickets: file stems, or the full paths where stems collide."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


@cli.command("check-plugin")
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


def main() -> None:
    cli(prog_name="vlprune")


if __name__ == "__main__":
    sys.exit(main())
