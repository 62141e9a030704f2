"""The flags that find, evaluate and transfer share, and the run settings made from them."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vl_prune_cli.errors import UserError

if TYPE_CHECKING:
    from vl_prune.adversarial import AdversarialSettings
    from vl_prune.experiment import FindSettings


class FiniteRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities too (its comparisons let NaN through)."""

    name = "number"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return number


def option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying several click options, listed in the order --help shows them."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# Fine-tuning flags shared by find, evaluate and transfer; unset ones come from the task's recipe.
training_options = option_group(
    click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps per fine-tuning."),
    click.option(
        "--lr",
        type=FiniteRange(min=0, min_open=True),
        help="Peak learning rate (linear warmup and decay).",
    ),
    click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step and process."),
    click.option(
        "--grad-accumulation", type=click.IntRange(min=1), help="Batches per optimizer step."
    ),
    click.option(
        "--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), help="Accelerate's."
    ),
    click.option(
        "--dropout",
        type=FiniteRange(0, 1, max_open=True),
        help="Dropout probability while fine-tuning [the model's own].",
    ),
    click.option(
        "--seed",
        type=click.IntRange(0, 2**32 - 1),
        help="Seed of the head, data order and dropout.",
    ),
    click.option(
        "--seeds",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Independent runs, seeded --seed, --seed + 1, …: scores are their mean and std.",
    ),
    click.option(
        "--num-workers",
        type=click.IntRange(min=0),
        help="Processes that read and collate batches [0 on CPU, up to 4 per GPU]; "
        "results do not depend on it.",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="CPU threads that train and evaluate [torch's count]; part of the run's identity "
        "(CPU sums depend on it). Jobs that share a machine do most at one thread each.",
    ),
)

DEFAULT_BACKBONE = "uniter"
model_option = click.option(
    "--model",
    "backbone",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="Backbone plugin (see `vlprune list backbones`).",
)
# evaluate and transfer train a ticket: on its own backbone unless told otherwise.
ticket_model_option = click.option(
    "--model",
    "backbone",
    help=f"Backbone plugin [the ticket's backbone, else {DEFAULT_BACKBONE}]; a ticket found on "
    "another backbone is refused.",
)

# Which weights and data: find, evaluate and transfer.
weights_and_data_options = option_group(
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
adversarial_options = option_group(
    click.option(
        "--adversarial", is_flag=True, help="Fine-tune adversarially (VILLA); adv-imp implies it."
    ),
    click.option("--adv-steps", type=int, help="Ascent steps per training step [3]."),
    click.option(
        "--adv-lr",
        type=FiniteRange(min=0, min_open=True),
        help="Size of each ascent step (L2) [1e-3].",
    ),
    click.option(
        "--adv-max-norm",
        type=FiniteRange(min=0),
        help="Bound on each perturbation's L2 norm [none].",
    ),
    click.option(
        "--adv-kl", type=FiniteRange(min=0), help="Weight of the clean/perturbed KL term [1.5]."
    ),
    click.option(
        "--adv-modality",
        type=click.Choice(["text", "image", "both"]),
        help="What is perturbed [both].",
    ),
)

_ADVERSARIAL_FLAGS = ("adv_steps", "adv_lr", "adv_max_norm", "adv_kl", "adv_modality")

runs_option = click.option(
    "--runs",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Folder of run folders (transfer keeps its results in its transfer/).",
)


def check_names(**names: str | None) -> None:
    """Plugin names (`backbones=…`, `tasks=…`, `methods=…`) looked up among the installed
    entry points, none loaded: a typo is named in a tenth of a second, before torch loads."""
    from vl_prune import registry

    for kind, name in names.items():
        if name is not None:
            registry.find(kind, name)


def new_file(flag: str, path: Path | None) -> None:
    """A file the command writes when it is done, checked before any work: an hour of training
    must not end in "folder does not exist"."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give the name of a file")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: folder {path.parent} is not writable")


def writable_folder(flag: str, path: Path | None) -> None:
    """A folder the command writes into, made if missing: checked before any work."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {existing}")


def find_settings(
    task: str,
    backbone: str,
    training: dict[str, Any],
    data: str | None,
    implied: bool = False,
    **extra: Any,
) -> FindSettings:
    """FindSettings from the flags; training flags left unset come from the task's recipe.
    `implied`: the method fine-tunes adversarially whether --adversarial is given or not."""
    from dataclasses import fields, replace

    from vl_prune.experiment import FindSettings, recipe
    from vl_prune.task import DataOptions

    training = dict(training)
    seeds = training.pop("seeds")
    options = DataOptions(**{f.name: training.pop(f.name) for f in fields(DataOptions)})
    adversarial = _adversarial(training, implied)
    given = {k: v for k, v in training.items() if v is not None}
    train = replace(recipe(task, data is None, backbone), **given, adversarial=adversarial)
    return FindSettings(
        backbone=backbone,
        task=task,
        data=data,
        train=train,
        data_options=options,
        seeds=seeds,
        **extra,
    )


def _adversarial(training: dict[str, Any], implied: bool) -> AdversarialSettings | None:
    """Pop the adversarial flags out of `training`; AdversarialSettings if asked for, else None."""
    from vl_prune.adversarial import AdversarialSettings

    wanted = training.pop("adversarial") or implied
    given = {k.removeprefix("adv_"): training.pop(k) for k in _ADVERSARIAL_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if given and not wanted:
        flag = "--adv-" + next(iter(given)).replace("_", "-")
        raise UserError(f"{flag} needs --adversarial (or an adversarial method such as adv-imp)")
    return AdversarialSettings(**given) if wanted else None
