"""Fine-tuning and evaluation on Hugging Face Accelerate: one plain loop for every task.

AdamW with UNITER's betas and weight decay, linear warmup then decay, gradient clipping and
accumulation, shuffling and dropout from the seed's streams (`vl_prune.seeds`); evaluation
gathers predictions from every process with `gather_for_metrics`. Pruned weights stay zero:
they are held at zero in place and their gradients masked (`zeros_in_place`). An interrupted
fine-tuning resumes from its last save (`vl_prune.train_state`).
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vl_prune import train_state
from vl_prune.adversarial import AdversarialSettings, adversarial_backward
from vl_prune.data.loader import EVALUATION_SEED, batches, raising
from vl_prune.errors import VLPruneError
from vl_prune.files import atomic_write
from vl_prune.pruning.layout import zeros_in_place
from vl_prune.seeds import Stream, seed_of
from vl_prune.task import Task, TaskBatch, VLModel


@dataclass(frozen=True)
class TrainSettings:
    """How to fine-tune; part of a run's identity (hashed into its directory name)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 2.0
    grad_accumulation: int = 1
    eval_batch_size: int = 64
    seed: int = 0
    mixed_precision: str = "no"
    #: fine-tune adversarially (VILLA) with these settings; None: plain fine-tuning
    adversarial: AdversarialSettings | None = None
    #: the probability of every dropout of the model while fine-tuning; None: each module's own
    dropout: float | None = None
    #: DataLoader worker processes (None: `vl_prune.data.loader.default_workers`); results do
    #: not depend on it, so it is no part of a run's identity
    num_workers: int | None = None
    #: CPU threads that train and evaluate (None: torch's own count). A CPU sums in another
    #: order on another count, so a set count is part of a run's identity. Jobs that share a
    #: machine do most at one thread each (README: `bench_find.py --pair`).
    threads: int | None = None

    @classmethod
    def unknown(cls, recipe: Mapping[str, Any]) -> list[str]:
        """The keys of a recipe (a task's or a world split's) that are no setting, sorted."""
        return sorted(set(recipe) - {f.name for f in fields(cls)})

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise VLPruneError("steps, batch size and gradient accumulation must be at least 1")
        if not 0 <= self.seed < 2**32:
            raise VLPruneError(f"--seed must be between 0 and 2**32 - 1, not {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise VLPruneError(f"--threads must be at least 1, not {self.threads}")
        if self.num_workers is not None and self.num_workers < 0:
            raise VLPruneError(f"--num-workers must be 0 or more, not {self.num_workers}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise VLPruneError(f"--dropout must be in [0, 1), not {self.dropout}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise VLPruneError(
                f"--mixed-precision must be no, fp16 or bf16, not {self.mixed_precision}"
            )

    def identity(self) -> dict[str, Any]:
        """The settings as hashed into the names of results: a field added later is left out
        while it is off, so results from before it keep their names."""
        fields = asdict(self)
        for later in ("adversarial", "dropout", "threads"):
            if fields[later] is None:
                del fields[later]
        del fields["num_workers"]
        return fields

    @property
    def workers(self) -> int:
        from vl_prune.data.loader import default_workers

        return default_workers() if self.num_workers is None else self.num_workers


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` inside (unchanged for None), restored after."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_accelerator(settings: TrainSettings, cpu: bool | None = None):
    """An Accelerator; on a machine without GPUs it is told so (cpu=True), otherwise every rank
    of a multi-process launch would silently run as its own one-process job."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from vl_prune.distributed import process_state

    if cpu is None:
        cpu = not torch.cuda.is_available()
    process_state(cpu)  # fails if something already made Accelerate's state blind to the job
    return Accelerator(
        cpu=cpu,
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.grad_accumulation,
        # Backbones hold parameters a task never uses (UNITER's masked-region embedding is
        # for pre-training only); DDP would stop at the first step of a multi-process job.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _batches_of(
    model: Any, task: Task, examples: Any, settings: TrainSettings, accelerator: Any, shuffle: bool
) -> tuple[Any, Any]:
    """The prepared loader of `examples` for `model`'s backbone (training batches shuffled,
    evaluation batches in order) and its epoch order."""
    backbone = accelerator.unwrap_model(model).backbone
    loader, order = batches(
        examples,
        partial(_collate, task, backbone),
        settings.batch_size if shuffle else settings.eval_batch_size,
        settings.seed,
        shuffle=shuffle,
        workers=settings.workers,
    )
    return accelerator.prepare(loader), order


def _collate(task: Task, backbone: Any, examples: list) -> TaskBatch:
    return task.collate(examples, backbone)


def _progress(total: int, description: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=description,
        leave=False,
        dynamic_ncols=True,
        disable=quiet or not sys.stderr.isatty(),
    )


@dataclass(frozen=True)
class Checkpoints:
    """Where and how often `fit` saves its whole state (`vl_prune.train_state`: weights,
    optimizer, schedule, random generators), so an interrupted fine-tuning continues from
    the last save with the same result as an uninterrupted one."""

    folder: Path
    every: int

    def latest(self) -> Path | None:
        """The last complete save, which `latest` names; None before the first."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(errors="replace").strip()
        saved = self.folder / name
        if not (re.fullmatch(rf"{STEP}\d+", name) and saved.is_dir()):
            raise VLPruneError(
                f"{pointer} names {name!r}, which is no save in {self.folder}; delete "
                f"{self.folder} to train the round again from its start"
            )
        return saved

    def stale(self) -> list[Path]:
        """Saves other than the latest: what a kill between a save and the deletion of the
        ones before it leaves."""
        latest = self.latest() if (self.folder / LATEST).is_file() else None
        return [path for path in self.folder.glob(f"{STEP}*") if path != latest]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
#: names fit's optimizer in the keys of cached results it trained (the world θ0): a change of
#: optimizer changes the weights
OPTIMIZER = "adamw-fused"
LATEST = "latest"
STEP = "step_"


def fit(
    model: VLModel,
    task: Task,
    examples: list,
    settings: TrainSettings,
    accelerator: Any,
    description: str = "train",
    quiet: bool = False,
    checkpoints: Checkpoints | None = None,
    on_step: Callable[[int], None] | None = None,
    start: int = 0,
) -> list[float]:
    """Fine-tune `model` (already through `accelerator.prepare`) up to step `settings.steps`;
    the losses of the steps this call ran.

    `start` > 0 trains from that step to the end (rewinding: the model holds the weights of
    step `start`), with that step's learning rate and data order and a fresh optimizer, as
    OpenLTH does. With `checkpoints`, the state is saved every `checkpoints.every` steps and a
    later call resumes from the last save. `on_step(step)` runs after every optimizer step. A
    NaN or infinite loss stops with a VLPruneError rather than training on garbage.
    """
    if not examples:
        raise VLPruneError(f"{description}: no training examples")
    if not 0 <= start < settings.steps:
        raise VLPruneError(f"{description}: cannot start at step {start} of {settings.steps}")
    torch.manual_seed(seed_of(settings.seed, Stream.DROPOUT))
    if settings.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = settings.dropout  # HF's attention reads it too (`dropout.p`)
    optimizer = _optimizer(model, settings, accelerator)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, start))
    # The scheduler stays unprepared: Accelerate would step it once per process.
    optimizer = accelerator.prepare(optimizer)
    step = _resume(model, optimizer, scheduler, accelerator, checkpoints) or start
    loader, order = _batches_of(model, task, examples, settings, accelerator, shuffle=True)
    model.train()
    losses: list[float] = []
    bar = _progress(settings.steps, description, quiet or not accelerator.is_main_process)
    # The pruned tensors train as plain parameters held at zero (`zeros_in_place`); the
    # model is back in torch's prune layout when training ends, however it ends.
    with bar, zeros_in_place(model) as mask_gradients:
        bar.update(step)
        while step < settings.steps:
            epoch = _rest_of_epoch(step, loader, order, len(examples), settings, accelerator)
            for batch in raising(epoch):
                with accelerator.accumulate(model):
                    loss = _backward(model, task, batch, settings, accelerator).item()
                    if not math.isfinite(loss):
                        raise VLPruneError(
                            f"{description}: loss became {loss} at step {step + 1}; "
                            "lower the learning rate"
                        )
                    _optimizer_step(
                        model, optimizer, scheduler, settings, accelerator, mask_gradients
                    )
                if not accelerator.sync_gradients:
                    continue  # an accumulation goes on
                step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if on_step is not None:
                    on_step(step)
                if checkpoints is not None and step % checkpoints.every == 0:
                    _save(model, optimizer, scheduler, accelerator, checkpoints, step)
                if step == settings.steps:
                    break
    return losses


def _optimizer(model: VLModel, settings: TrainSettings, accelerator: Any) -> torch.optim.AdamW:
    """AdamW with UNITER's betas; weight decay on matrices only, not on biases or LayerNorms."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=settings.betas,
        # One kernel for every tensor: the per-tensor loop cost small models 6% of a step. Not
        # under fp16's GradScaler: fused AdamW skips overflow steps itself, and Accelerate
        # would no longer see the skip (the schedule must not advance on one).
        fused=accelerator.scaler is None
        and all(p.device.type in FUSED_ADAMW_DEVICES for p in model.parameters()),
    )


def _schedule(settings: TrainSettings, start: int = 0) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warmup, then linear decay to zero; the
    scheduler's step 0 is the schedule's step `start`."""
    warmup = max(1, int(settings.warmup * settings.steps))

    def factor(taken: int) -> float:
        step = start + taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    return factor


def _resume(
    model: Any, optimizer: Any, scheduler: Any, accelerator: Any, checkpoints: Checkpoints | None
) -> int:
    """The step training starts from: that of the last saved state, loaded, or 0."""
    saved = None if checkpoints is None else checkpoints.latest()
    if saved is None:
        return 0
    train_state.load(saved, model, optimizer, scheduler, accelerator)
    return int(saved.name.removeprefix(STEP))


def _rest_of_epoch(
    step: int, loader: Any, order: Any, examples: int, settings: TrainSettings, accelerator: Any
) -> Any:
    """The batches of the epoch `step` falls in, from `step` on. Each epoch has one fixed order,
    so a resumed run sees the batches the first run would."""
    accumulation = settings.grad_accumulation
    epoch_steps = math.ceil(_batches(examples, settings, accelerator) / accumulation)
    epoch, done = divmod(step, epoch_steps)
    order.start(epoch)
    return accelerator.skip_first_batches(loader, done * accumulation) if done else loader


def _optimizer_step(
    model: VLModel,
    optimizer: Any,
    scheduler: Any,
    settings: TrainSettings,
    accelerator: Any,
    mask_gradients: Callable[[], None],
) -> None:
    """Mask pruned gradients, clip and step at the end of an accumulation (Accelerate makes the
    steps in between no-ops); the schedule advances only on a step the optimizer took."""
    if accelerator.sync_gradients:
        mask_gradients()
        accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    optimizer.zero_grad()


def _backward(
    model: VLModel, task: Task, batch: TaskBatch, settings: TrainSettings, accelerator: Any
) -> torch.Tensor:
    """Accumulate one batch's gradients; the (clean) loss."""
    if settings.adversarial is not None:
        return adversarial_backward(model, task, batch, settings.adversarial, accelerator).loss
    loss = task.loss(model(batch), batch.targets)
    if math.isfinite(loss.item()):
        accelerator.backward(loss)
    return loss


def _batches(examples: int, settings: TrainSettings, accelerator: Any) -> int:
    """Batches per epoch on each process (Accelerate evens them out across processes)."""
    return math.ceil(math.ceil(examples / settings.batch_size) / accelerator.num_processes)


def _save(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    accelerator: Any,
    checkpoints: Checkpoints,
    step: int,
) -> None:
    """Save under a new name, point `latest` at it, then drop older saves: a kill at any
    moment leaves `latest` naming a complete save (or none)."""
    name = f"{STEP}{step:07d}"
    folder = checkpoints.folder / name
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)  # a save a kill interrupted
    accelerator.wait_for_everyone()
    train_state.save(folder, model, optimizer, scheduler, accelerator)
    accelerator.wait_for_everyone()  # every process's random states are written
    if accelerator.is_main_process:
        atomic_write(checkpoints.folder / LATEST, name.encode())
        for old in checkpoints.stale():
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate(
    model: VLModel,
    task: Task,
    examples: list,
    settings: TrainSettings,
    accelerator: Any,
) -> float:
    """The task's primary score over `examples`, gathered from every process; `model` is
    already through `accelerator.prepare`. Collation randomness (pre-training's masks) is
    seeded, whatever the run's seed, so every model is scored on the same inputs."""
    if not examples:
        raise VLPruneError("nothing to evaluate: the split is empty")
    with torch.random.fork_rng():
        torch.manual_seed(seed_of(EVALUATION_SEED, Stream.EVALUATE))
        return _evaluate(model, task, examples, settings, accelerator)


def _evaluate(model, task, examples, settings, accelerator) -> float:
    loader, _ = _batches_of(model, task, examples, settings, accelerator, shuffle=False)
    model.eval()
    predictions, targets = [], []
    batch: TaskBatch
    for batch in raising(loader):
        gathered = accelerator.gather_for_metrics((task.predict(model(batch)), batch.targets))
        predictions.append(gathered[0])
        targets.append(gathered[1])
    return task.score(_cat(predictions), _cat(targets))


def _cat(chunks: list[Any]) -> Any:
    """Batches joined along the first dimension; per-token tensors whose lengths differ
    between batches are padded with -100, the ignore label."""
    if isinstance(chunks[0], dict):
        return {key: _cat([c[key] for c in chunks]) for key in chunks[0]}
    if chunks[0].dim() >= 2:
        length = max(c.shape[1] for c in chunks)
        chunks = [
            torch.nn.functional.pad(
                c, (0, 0) * (c.dim() - 2) + (0, length - c.shape[1]), value=-100
            )
            for c in chunks
        ]
    return torch.cat(chunks)
