"""The lottery-ticket driver: IMP rounds, rewinding, baselines, in a resumable run folder.

A run lives in `runs/<backbone>-<task>-<method>-<hash>/`, the hash taken over everything that
decides its results. Round 0 fine-tunes the dense model from (θ0, φ0); round r trains the mask
that the method cut for it from the reset weights. A round is finished once its
`metrics.json` exists: the same command again skips finished rounds and continues an
unfinished one from its last checkpoint (open_lth's levels and "skip what is done").
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vl_prune.adversarial import AdversarialSettings
from vl_prune.backbone import Backbone, Inputs
from vl_prune.baselines import load_other_weights, shuffle_within_tensors
from vl_prune.checkpoint import read_state_dict
from vl_prune.contract import load_checked
from vl_prune.distributed import process_state
from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write
from vl_prune.pruning import SCHEDULES, ScorePruning, geometric, linear, prune_to
from vl_prune.pruning.aliases import resolve
from vl_prune.task import DataOptions, VLModel
from vl_prune.ticket import FingerprintMismatch, Ticket, current_weights, fingerprint
from vl_prune.train import Checkpoints, TrainSettings, evaluate, fit, make_accelerator
from vl_prune.world import embedded_world

TICKET = "ticket.safetensors"
METRICS = "metrics.json"
REWIND = "rewind.safetensors"


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

    def __post_init__(self):
        if not 0.0 < self.sparsity < 1.0:
            raise VLPruneError(f"--sparsity must be strictly between 0 and 1, not {self.sparsity}")
        if self.tokenizer is not None and self.checkpoint is None:
            raise VLPruneError("--tokenizer goes with --checkpoint (the world has its own)")
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
        fields["data_options"] = {k: v for k, v in fields["data_options"].items() if v is not None}
        for later in ("data_options", "tokenizer", "one_shot"):
            if not fields[later]:
                del fields[later]
        return fields

    @property
    def label(self) -> str:
        """The method as typed, with the procedure settings given besides it: `random-rewind`."""
        extras = [("oneshot", self.one_shot), ("rewind", self.rewind_step is not None)]
        return "-".join([self.method, *(name for name, given in extras if given)])

    @property
    def embedded(self) -> bool:
        """No real weights and no real data: the tiny preset on the embedded world."""
        return self.checkpoint is None and self.data is None


def recipe(task: str, world: bool) -> TrainSettings:
    """The task's fine-tuning settings for the embedded world or for real data."""
    if world:
        return TrainSettings(**embedded_world().recipe(task))
    return TrainSettings(**load_checked("tasks", task).recipe)


class Experiment:
    """A task's data and the untrained model (θ0 and a seeded φ0) that every round starts from.

    The data is read and the first batch of each split collated before any weights are: a
    data problem fails in seconds, before θ0 is built or a checkpoint read."""

    def __init__(self, settings: FindSettings, log: Callable[[str], None] = lambda line: None):
        self.settings = settings
        backbone_class = load_checked("backbones", settings.backbone)
        task_class = load_checked("tasks", settings.task)
        task_class.check_backbone(backbone_class)  # before any data or θ0 is built
        if settings.checkpoint is None and settings.preset not in (None, "tiny"):
            raise VLPruneError(
                f"no pre-trained weights for {settings.backbone}-{settings.preset}: "
                "pass --checkpoint (without one only the embedded tiny preset exists)"
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
        torch.manual_seed(settings.train.seed)  # φ0: the same head for every round
        # The head may grow the backbone (a second image type): build it before θ0 is read.
        self.template = VLModel(backbone, self.task.head(backbone))
        if backbone.load_report is not None:
            log(str(backbone.load_report))
        self.names = backbone.prunable_names()
        weights = current_weights(backbone, self.names)
        self.total = sum(w.numel() for w in weights.values())
        self.fingerprint = fingerprint(weights)
        self.data = data.resolve()

    def _inputs(self, backbone_class: type[Backbone]) -> Inputs | Backbone:
        """What collation needs of the backbone, before any weights: a checkpoint's shapes, or
        for the world a fresh tiny backbone (θ0 is built later)."""
        settings = self.settings
        if settings.checkpoint is not None:
            return backbone_class.inputs(settings.preset, settings.checkpoint, settings.tokenizer)
        if "tiny" not in backbone_class.presets:
            raise VLPruneError(
                f"{settings.backbone} has no tiny preset for the embedded world to pre-train: "
                "pass --checkpoint"
            )
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

    def fresh(self) -> VLModel:
        """A copy of the untrained model."""
        return copy.deepcopy(self.template)

    def train(
        self,
        model: VLModel,
        description: str,
        quiet: bool = False,
        checkpoints: Checkpoints | None = None,
        on_step: Callable[[int, VLModel], None] | None = None,
    ) -> tuple[float, VLModel]:
        """Fine-tune `model` on the training split; its score on the evaluation split and
        the trained model."""
        settings = self.settings.train
        accelerator = make_accelerator(settings)
        prepared = accelerator.prepare(model)

        def step_done(step: int) -> None:
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(prepared))

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
        )
        score = evaluate(prepared, self.task, self.eval_examples, settings, accelerator)
        return score, accelerator.unwrap_model(prepared)

    def score(self, model: VLModel) -> float:
        """`model`'s score on the evaluation split, without training."""
        accelerator = make_accelerator(self.settings.train)
        prepared = accelerator.prepare(model)
        return evaluate(prepared, self.task, self.eval_examples, self.settings.train, accelerator)


class Lottery:
    """Finds tickets: one run folder, its rounds, its report."""

    def __init__(
        self,
        settings: FindSettings,
        runs: str | Path = "runs",
        checkpoint_every: int = 50,
        quiet: bool = False,
        log: Callable[[str], None] = lambda line: None,
    ):
        method, alias = resolve(settings.method)
        if not (isinstance(method, type) and issubclass(method, ScorePruning)):
            raise VLPruneError(
                f"method {settings.method!r} is not a ScorePruning method and cannot run rounds"
            )
        if alias is not None and alias.rewind and settings.rewind_step is None:
            raise VLPruneError(f"method {settings.method!r} needs --rewind-step")
        if checkpoint_every < 1:
            raise VLPruneError(f"--checkpoint-every must be at least 1, not {checkpoint_every}")
        if alias is not None and alias.adversarial and settings.train.adversarial is None:
            adversarial = replace(settings.train, adversarial=AdversarialSettings())
            settings = replace(settings, train=adversarial)
        self.settings, self.method = settings, method
        #: the procedure: one-shot cuts, and rewinding (to θ_k, k = `rewind_step`)
        self.one_shot = settings.one_shot or (alias is not None and alias.one_shot)
        self.rewinds = settings.rewind_step is not None
        self.checkpoint_every, self.quiet, self.log = checkpoint_every, quiet, log
        self.experiment = Experiment(settings, log)
        total = self.experiment.total
        if settings.schedule == "geometric":
            self.targets = geometric(total, settings.rate, settings.sparsity)
        else:
            self.targets = linear(total, settings.sparsity)
        self.config = {
            **settings.identity(),
            "preset": self.experiment.template.backbone.preset,
            "data": str(self.experiment.data),
            "weights_fingerprint": self.experiment.fingerprint,
        }
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        name = f"{settings.backbone}-{settings.task}-{settings.label}-{digest[:10]}"
        self.folder = Path(runs) / name

    @property
    def rounds(self) -> int:
        """Rounds after the dense one."""
        return len(self.targets)

    def run(self, keep: float = 0.99) -> dict[str, Any]:
        """Run (or finish) every round and write the report, curve and final ticket."""
        if not 0.0 < keep <= 1.0:
            raise VLPruneError(f"--keep must be in (0, 1], not {keep}")
        state = process_state()
        if state.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            config = self.folder / "config.json"
            if not config.is_file():
                atomic_write(config, json.dumps(self.config, indent=2).encode())
        state.wait_for_everyone()
        started, history, ran = time.perf_counter(), [], []
        for r in range(self.rounds + 1):
            history.append(self._round(r, history))
            if not history[-1].get("skipped"):
                ran.append(history[-1]["seconds"])
                if r < self.rounds:
                    left = (self.rounds - r) * sum(ran) / len(ran)
                    self.log(f"  about {_duration(left)} left")
        report = self._report(history, keep)
        if state.is_main_process:
            self._write_outputs(report)
        state.wait_for_everyone()
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report

    def _round(self, r: int, history: list[dict]) -> dict[str, Any]:
        folder = self.folder / f"round_{r:02d}"
        done = folder / METRICS
        if done.is_file():
            metrics = json.loads(done.read_text())
            self.log(f"round {r}/{self.rounds}: finished earlier, skipped ({_line(metrics)})")
            return {**metrics, "skipped": True}
        state = process_state()
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        model = self.experiment.fresh()
        if r > 0:
            ticket_path = folder / TICKET
            if not ticket_path.is_file():
                raise VLPruneError(
                    f"{ticket_path} is missing: round {r - 1} finished without cutting it; "
                    f"delete {folder.parent / f'round_{r - 1:02d}'} to redo that round"
                )
            Ticket.load(ticket_path).apply(model.backbone, strict=True)
            if self.rewinds:
                _load_weights(model, read_state_dict(self.folder / "round_00" / REWIND))
        own = Ticket.from_model(model.backbone, model.backbone.prunable())
        self.log(
            f"round {r}/{self.rounds}: training at sparsity {own.sparsity:.1%}"
            + (" (dense)" if r == 0 else "")
        )
        started = time.perf_counter()
        score, trained = self.experiment.train(
            model,
            description=f"round {r}/{self.rounds}",
            quiet=self.quiet,
            checkpoints=Checkpoints(folder / "checkpoint", self.checkpoint_every),
            on_step=self._rewind_saver() if r == 0 and self.rewinds else None,
        )
        dense = score if r == 0 else history[0]["score"]
        metrics = {
            "round": r,
            "sparsity": own.sparsity,
            "score": score,
            "fraction_of_dense": score / dense if dense else 0.0,
            "seconds": round(time.perf_counter() - started, 1),
        }
        records = [{k: h[k] for k in ("round", "sparsity", "score")} for h in [*history, metrics]]
        self._cut(r, trained, dense, records)
        if state.is_main_process:
            self._ticket(own, r, dense, records, score=score).save(folder / TICKET)
            atomic_write(done, json.dumps(metrics, indent=2).encode())
            shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        state.wait_for_everyone()
        self.log(f"round {r}/{self.rounds}: {_line(metrics)}")
        return metrics

    def _cut(self, r: int, trained: VLModel, dense: float, records: list[dict]) -> None:
        """Write the masks that round r's trained weights give the rounds after it: the next
        round's, or (one-shot, after the dense round) every round's."""
        if self.one_shot:
            levels = range(1, self.rounds + 1) if r == 0 else range(0)
        else:
            levels = range(r + 1, min(r + 1, self.rounds) + 1)
        if levels and process_state().is_main_process:
            # Later rounds derive from this cut: anything left of them (a redone round) is stale.
            for later in range(r + 1, self.rounds + 1):
                shutil.rmtree(self.folder / f"round_{later:02d}", ignore_errors=True)
        process_state().wait_for_everyone()
        parameters = trained.backbone.prunable()
        for level in levels:
            # The trained model itself is cut: its masks are the next round's ticket.
            prune_to(parameters, self.method, self.targets[level - 1], seed=self._seed(level))
            if process_state().is_main_process:
                cut = Ticket.from_model(trained.backbone, parameters)
                (self.folder / f"round_{level:02d}").mkdir(exist_ok=True)
                self._ticket(cut, level, dense, records).save(
                    self.folder / f"round_{level:02d}" / TICKET
                )

    def _seed(self, level: int) -> int:
        """The seed of a round's random choices (random pruning), fixed by the run's seed."""
        return self.settings.train.seed * 1000 + level

    def _rewind_saver(self) -> Callable[[int, VLModel], None]:
        """Saves θ_k and φ_k, the dense run's weights after `rewind_step` steps."""

        def save(step: int, model: VLModel) -> None:
            if step == self.settings.rewind_step and process_state().is_main_process:
                from safetensors.torch import save as to_bytes

                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                atomic_write(self.folder / "round_00" / REWIND, to_bytes(state))

        return save

    def _ticket(
        self, ticket: Ticket, r: int, dense: float, history: list[dict], score: float | None = None
    ) -> Ticket:
        settings = self.settings
        ticket.metadata.update(
            backbone=settings.backbone,
            preset=self.config["preset"],
            weights_fingerprint=self.experiment.fingerprint,
            task=settings.task,
            metric=self.experiment.task.metric,
            method=settings.label,
            schedule=settings.schedule,
            round=r,
            score=score,
            dense_score=dense,
            history=history,
            run=self.folder.name,
        )
        return ticket

    def _report(self, history: list[dict], keep: float) -> dict[str, Any]:
        dense = history[0]["score"]
        rounds = [{k: v for k, v in h.items() if k != "skipped"} for h in history]
        holding = [h for h in rounds if h["score"] >= keep * dense]
        final = max(holding, key=lambda h: h["sparsity"])
        return {
            "run": self.folder.name,
            "backbone": self.settings.backbone,
            "preset": self.config["preset"],
            "task": self.settings.task,
            "metric": self.experiment.task.metric,
            "method": self.settings.label,
            "dense_score": dense,
            "keep": keep,
            "rounds": rounds,
            "final": {**final, "ticket": str(self.folder / TICKET)},
        }

    def _write_outputs(self, report: dict[str, Any]) -> None:
        from vl_prune.plots import curves

        chosen = self.folder / f"round_{report['final']['round']:02d}" / TICKET
        atomic_write(self.folder / TICKET, chosen.read_bytes())
        atomic_write(self.folder / "report.json", json.dumps(report, indent=2).encode())
        curves([report], self.folder / "curve.png")


def train_ticket(
    ticket: Ticket,
    settings: FindSettings,
    force: bool = False,
    quiet: bool = False,
    weights: str = "theta0",
    lora: Lora | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Train a ticket's mask from θ0 (and a fresh head) on `settings.task` and score it;
    `weights` "shuffled" starts from θ0 shuffled within each prunable tensor, a file path from
    another pre-trained set (see `vl_prune.baselines`); `lora` trains LoRA adapters over the
    frozen masked backbone instead of the backbone itself."""
    return train_mask(Experiment(settings, log), ticket, force, quiet, weights, lora)


@dataclass(frozen=True)
class Lora:
    """LoRA adapters on a ticket: their rank, the new folder they are saved in (peft format),
    and where to write the weights with the adapters merged in, mask kept (None: no merge)."""

    rank: int
    adapters: Path | None = None
    merged: Path | None = None


def train_mask(
    experiment: Experiment,
    ticket: Ticket | None,
    force: bool = False,
    quiet: bool = False,
    weights: str = "theta0",
    lora: Lora | None = None,
) -> dict[str, Any]:
    """`train_ticket` on an experiment already set up; `ticket=None` trains the dense model."""
    model = experiment.fresh()
    other = apply_ticket(ticket, model, force) if ticket is not None else False
    result = {}
    if weights == "shuffled":
        shuffle_within_tensors(model, experiment.settings.train.seed)
    elif weights != "theta0":
        replaced = load_other_weights(model, weights)
        result["replaced"] = {"taken": len(replaced.taken), "kept": replaced.kept}
    if lora is not None:
        from vl_prune.lora import add_lora

        model = add_lora(model, lora.rank)
    what = "dense" if ticket is None else f"{ticket.sparsity:.0%} ticket"
    what += f" + LoRA r{lora.rank}" if lora is not None else ""
    score, trained = experiment.train(model, f"{what} on {experiment.settings.task}", quiet=quiet)
    if lora is not None:
        result["lora"] = _finish_lora(experiment, trained, lora, score)
    return {
        **_result(ticket, experiment, score),
        "other_weights": other,
        "weights": weights,
        **result,
    }


def _finish_lora(experiment: Experiment, trained: Any, lora: Lora, score: float) -> dict:
    """Save the adapters and, if asked, merge them keeping the mask, score the merged model
    and write its weights (pruned entries zero, torch names)."""
    from vl_prune.lora import merge_lora, save_adapters

    state = process_state()
    out: dict[str, Any] = {"rank": lora.rank}
    if lora.adapters is not None:
        if state.is_main_process:
            settings = experiment.settings
            save_adapters(trained, lora.adapters, task=settings.task, backbone=settings.backbone)
        state.wait_for_everyone()
        out["adapters"] = str(lora.adapters)
    if lora.merged is not None:
        batch = experiment.task.collate(experiment.eval_examples[:8], trained.backbone)
        merged, report = merge_lora(trained, batch)
        merged_score = experiment.score(merged)
        if state.is_main_process:
            from safetensors.torch import save as to_bytes

            atomic_write(lora.merged, to_bytes(_baked(merged)))
        state.wait_for_everyone()
        out["merge"] = {
            "path": str(lora.merged),
            "score": merged_score,
            "score_before": score,
            "dropped": report.dropped,
            "max_change": report.max_change,
            "report": str(report),
        }
    return out


def _baked(model: VLModel) -> dict[str, torch.Tensor]:
    """The model's tensors under their plain names, pruned entries zero: what
    `prune.remove` would leave, without touching `model`."""
    tensors = model.state_dict()
    state = {}
    for name, value in tensors.items():
        if name.endswith("_mask"):
            continue
        plain = name.removesuffix("_orig")
        if name.endswith("_orig"):
            value = torch.where(tensors[plain + "_mask"].bool(), value, 0.0)
        state[plain] = value.detach().cpu().contiguous()
    return state


def score_finetuned(
    ticket: Ticket | None,
    weights: str | Path,
    settings: FindSettings,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Score fine-tuned weights (a VLModel state dict: `backbone.*`, `head.*`), with the
    ticket's mask applied, on the evaluation split; no training."""
    experiment = Experiment(settings, log)
    model = experiment.fresh()
    if ticket is not None:
        apply_ticket(ticket, model, force=True)
    _load_weights(model, read_state_dict(weights))
    score = experiment.score(model)
    return _result(Ticket.from_model(model.backbone, model.backbone.prunable()), experiment, score)


def apply_ticket(ticket: Ticket, model: VLModel, force: bool) -> bool:
    """Prune `model` to the ticket; whether the ticket came from other weights (only allowed
    with `force`)."""
    found = ticket.metadata.get("weights_fingerprint")
    other = bool(found) and found != fingerprint(current_weights(model.backbone, ticket.masks))
    if other and not force:
        raise VLPruneError(
            "the ticket was found from other weights than this backbone's θ0 "
            "(fingerprint differs); pass --force to train it anyway"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FingerprintMismatch)  # checked above
        ticket.apply(model.backbone)
    return other


def _result(ticket: Ticket | None, experiment: Experiment, score: float) -> dict[str, Any]:
    return {
        "task": experiment.settings.task,
        "metric": experiment.task.metric,
        "score": score,
        "sparsity": 0.0 if ticket is None else ticket.sparsity,
    }


def _load_weights(model: VLModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (plain parameter names) into `model`, whose pruned weights keep their
    values under `<name>_orig`; every tensor of the model must be given."""
    own = model.state_dict()
    for name, target in own.items():
        if name.endswith("_mask"):
            continue
        plain = name.removesuffix("_orig")
        value = state.get(plain, state.get(name))
        if value is None:
            raise VLPruneError(f"weights file has no tensor {plain!r}")
        if value.shape != target.shape:
            raise VLPruneError(
                f"tensor {plain!r} has shape {tuple(value.shape)}, the model's "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value)


def _line(metrics: dict[str, Any]) -> str:
    return (
        f"sparsity {metrics['sparsity']:.1%}, score {metrics['score']:.4f} "
        f"({metrics['fraction_of_dense']:.1%} of dense)"
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
