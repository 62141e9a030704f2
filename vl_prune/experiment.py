"""One run's settings and what every fine-tuning of it starts from: the data, θ0 and φ0.

`FindSettings` is everything that decides a run's results (hashed into its folder name);
`Experiment` reads the task's data (checked before any weights), builds θ0 (the checkpoint's,
or the embedded world's when there is none) and, for each seed, a head φ0, and fine-tunes and
scores copies of that model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vl_prune.backbone import Backbone, Inputs
from vl_prune.contract import load_checked
from vl_prune.data.fingerprint import data_fingerprint
from vl_prune.errors import VLPruneError
from vl_prune.pruning import SCHEDULES
from vl_prune.seeds import Stream, seed_of
from vl_prune.task import DataOptions, VLModel
from vl_prune.ticket import current_weights, fingerprint
from vl_prune.train import (
    Checkpoints,
    TrainSettings,
    cpu_threads,
    evaluate,
    fit,
    make_accelerator,
)
from vl_prune.world import embedded_world


@dataclass(frozen=True)
class FindSettings:
    """Everything that decides a run's results; hashed into its folder name."""

    backbone: str
    task: str
    method: str = "imp"
    preset: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    schedule: str = "linear"
    rate: float = 0.2
    sparsity: float = 0.9
    #: rewinding: survivors restart from the dense run's weights after this many steps
    rewind_step: int | None = None
    #: every sparsity cut at once from the dense-trained weights, not round by round
    one_shot: bool = False
    train: TrainSettings = field(default_factory=TrainSettings)
    #: how the task reads --data (splits, text length, answers)
    data_options: DataOptions = field(default_factory=DataOptions)
    #: a local tokenizer for the checkpoint (a folder or vocab.txt)
    tokenizer: str | None = None
    #: independent runs, seeds `train.seed`, `train.seed + 1`, …: each its own head φ0, data
    #: order and dropout (no part of the identity: each seed's results are kept by seed)
    seeds: int = 1

    def __post_init__(self):
        if self.seeds < 1:
            raise VLPruneError(f"--seeds must be at least 1, not {self.seeds}")
        if self.train.seed + self.seeds > 2**32:
            raise VLPruneError(
                f"--seed + --seeds must stay below 2**32, not {self.train.seed + self.seeds}"
            )
        if not 0.0 < self.sparsity < 1.0:
            raise VLPruneError(f"--sparsity must be strictly between 0 and 1, not {self.sparsity}")
        if self.tokenizer is not None and self.checkpoint is None:
            raise VLPruneError("--tokenizer goes with --checkpoint (the world has its own)")
        given = [name for name, value in asdict(self.data_options).items() if value is not None]
        if given and self.data is None:
            flag = "--" + given[0].replace("_", "-")
            raise VLPruneError(f"{flag} describes --data; the world has its own")
        if self.schedule not in SCHEDULES:
            known = ", ".join(SCHEDULES)
            raise VLPruneError(f"unknown --schedule {self.schedule!r}; choose from {known}")
        if self.schedule == "geometric" and not 0.0 < self.rate < 1.0:
            raise VLPruneError(f"--rate must be strictly between 0 and 1, not {self.rate}")
        if self.rewind_step is not None and not 1 <= self.rewind_step < self.train.steps:
            raise VLPruneError(
                f"--rewind-step must be between 1 and --steps - 1 ({self.train.steps - 1}), "
                f"not {self.rewind_step}"
            )

    def identity(self) -> dict[str, Any]:
        """The settings as hashed into run names (see `TrainSettings.identity`); settings added
        later are left out while unset, so earlier runs keep their names."""
        fields = {**asdict(self), "train": self.train.identity()}
        del fields["seeds"]
        fields["data_options"] = {k: v for k, v in fields["data_options"].items() if v is not None}
        for later in ("data_options", "tokenizer", "one_shot"):
            if not fields[later]:
                del fields[later]
        return fields


def recipe(task: str, world: bool, backbone: str | None = None) -> TrainSettings:
    """The task's fine-tuning settings for the embedded world (`backbone`'s, where the world's
    split has its own) or for real data."""
    task_class = load_checked("tasks", task)
    if world:
        return TrainSettings(**embedded_world().recipe(task, backbone))
    return TrainSettings(**task_class.recipe)


class Experiment:
    """A task's data and the untrained model (θ0 and a seeded φ0) that every round starts from.

    The data is read and the first batch of each split collated before any weights are: a
    data problem fails in seconds, before θ0 is built or a checkpoint read."""

    def __init__(self, settings: FindSettings, log: Callable[[str], None] = lambda line: None):
        self.settings = settings
        backbone_class = load_checked("backbones", settings.backbone)
        task_class = load_checked("tasks", settings.task)
        task_class.check_backbone(backbone_class)  # before any data or θ0 is built
        if settings.checkpoint is None:
            if settings.preset not in (None, "tiny") or "tiny" not in backbone_class.presets:
                raise VLPruneError(
                    f"no pre-trained weights for {settings.backbone}-{settings.preset or 'tiny'}: "
                    "pass --checkpoint (the embedded world pre-trains tiny presets only)"
                )
            if settings.data is None:
                log(
                    f"No --checkpoint/--data: running {settings.backbone}-tiny on the embedded "
                    f"world's {settings.task} (θ0 pre-trained on the world, built once and "
                    "cached); for real data pass --checkpoint WEIGHTS --data FOLDER."
                )
        data = Path(settings.data) if settings.data else embedded_world().data(settings.task)
        self.task = task_class(data, settings.data_options)
        train_split, eval_split = self.task.train_split, self.task.eval_split
        self.train_examples = self.task.examples(train_split)
        self.eval_examples = self.task.examples(eval_split)
        inputs = self._inputs(backbone_class)
        self._check_vocabulary(inputs)
        self._collate_first_batches(inputs)
        log(
            f"data: {settings.task} {train_split} ({len(self.train_examples):,} examples), "
            f"scored on {eval_split} ({len(self.eval_examples):,}), from {data}"
        )
        if settings.checkpoint is None:
            backbone = embedded_world().theta0(backbone_class, settings.backbone)
        elif isinstance(inputs, Backbone):  # the plugin built it to tell its inputs
            backbone = inputs
        else:
            backbone = backbone_class.build(settings.preset, settings.checkpoint)
            if settings.tokenizer is not None:
                backbone.use_tokenizer(settings.tokenizer)
        #: θ0 as built, before a head grows it (a second image type)
        self.theta0 = backbone
        # What every seed's model shares, read off one (its backbone grown by the head) that is
        # not kept: a second copy of a large backbone would stay in memory for nothing.
        first = self.fresh().backbone
        self.preset = first.preset
        if first.load_report is not None:
            log(str(first.load_report))
        self.names = first.prunable_names()
        weights = current_weights(first, self.names)
        self.total = sum(w.numel() for w in weights.values())
        self.fingerprint = fingerprint(weights)
        self.data = data.resolve()
        #: what runs and caches are keyed by: the data's contents, not its path
        self.data_fingerprint = data_fingerprint(self.data)

    def _inputs(self, backbone_class: type[Backbone]) -> Inputs | Backbone:
        """What collation needs of the backbone, before any weights: a checkpoint's shapes, or
        for the world a fresh tiny backbone (θ0 is built later)."""
        settings = self.settings
        if settings.checkpoint is not None:
            return backbone_class.inputs(settings.preset, settings.checkpoint, settings.tokenizer)
        return backbone_class.inputs("tiny")

    def _check_vocabulary(self, inputs: Inputs | Backbone) -> None:
        """Texts must come as ids of the backbone's words: a txt_db tokenised for another
        vocabulary, or a tokenizer with more words than the checkpoint, would be read as other
        words or index past the word embedding."""
        words, size = self.task.text_vocabulary, inputs.vocab_size
        if size is None:
            return
        if words is not None and not words.size <= size <= words.size + words.added:
            raise VLPruneError(
                f"{self.task.data}: the texts were tokenised by {words.tokenizer or 'a tokenizer'} "
                f"({words.size:,} words, meta.json), {inputs.label} has {size:,} words: give a "
                "checkpoint of that vocabulary"
            )
        if words is None and len(inputs.tokenizer) > size:
            raise VLPruneError(
                f"the tokenizer has {len(inputs.tokenizer):,} words, {inputs.label} "
                f"{size:,}: give the checkpoint's own tokenizer (--tokenizer)"
            )

    def _collate_first_batches(self, inputs: Inputs | Backbone) -> None:
        """Collate the first batch of each split: annotation records, features, tokenizer and
        their fit to the backbone are checked before anything expensive."""
        train = self.settings.train
        with torch.random.fork_rng(devices=[]):
            for split, examples, size in (
                (self.task.train_split, self.train_examples, train.batch_size),
                (self.task.eval_split, self.eval_examples, train.eval_batch_size),
            ):
                if not len(examples):
                    raise VLPruneError(f"{self.task.data}: split {split!r} has no examples")
                self.task.collate(list(examples[:size]), inputs)

    def fresh(self, seed: int | None = None) -> VLModel:
        """A copy of θ0 with the head φ0 of `seed` (default: the settings' seed): every round
        of a seed starts from the same head."""
        backbone = copy.deepcopy(self.theta0)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA's, outside the fork.
            torch.random.default_generator.manual_seed(seed_of(self._seed(seed), Stream.HEAD))
            # The head may grow the backbone (a second image type).
            return VLModel(backbone, self.task.head(backbone))

    def _seed(self, seed: int | None) -> int:
        return self.settings.train.seed if seed is None else seed

    def train(
        self,
        model: VLModel,
        description: str,
        seed: int | None = None,
        quiet: bool = False,
        checkpoints: Checkpoints | None = None,
        on_step: Callable[[int, VLModel], None] | None = None,
        start: int = 0,
    ) -> tuple[float, VLModel]:
        """Fine-tune `model` on the training split with `seed`'s data order and dropout (from
        step `start` on: see `fit`); its score on the evaluation split and the trained model."""
        settings = replace(self.settings.train, seed=self._seed(seed))
        accelerator = make_accelerator(settings)
        prepared = accelerator.prepare(model)

        def step_done(step: int) -> None:
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(prepared))

        with cpu_threads(settings.threads):
            fit(
                prepared,
                self.task,
                self.train_examples,
                settings,
                accelerator,
                description=description,
                quiet=quiet,
                checkpoints=checkpoints,
                on_step=step_done,
                start=start,
            )
            score = evaluate(prepared, self.task, self.eval_examples, settings, accelerator)
        return score, accelerator.unwrap_model(prepared)

    def score(self, model: VLModel) -> float:
        """`model`'s score on the evaluation split, without training."""
        accelerator = make_accelerator(self.settings.train)
        prepared = accelerator.prepare(model)
        with cpu_threads(self.settings.train.threads):
            return evaluate(
                prepared, self.task, self.eval_examples, self.settings.train, accelerator
            )
