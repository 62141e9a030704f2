"""Batches for training and evaluation, collated in DataLoader worker processes.

Reading region features (LMDB, npz) and collating run in `num_workers` processes while the
accelerator trains on the previous batch. Whatever randomness a task's collation draws
(pre-training's masks, retrieval's negatives) comes from a stream of the run's seed keyed by
the epoch and the batch's examples, so a batch is the same whichever process collates it:
results do not depend on the number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vl_prune.data.regions import FEATURE_FILES
from vl_prune.errors import VLPruneError
from vl_prune.seeds import Stream, seed_of

#: the seed evaluation batches are collated with, whatever the run's seed: every model, of
#: every seed, is scored on the same inputs (pre-training's masks)
EVALUATION_SEED = 0


def default_workers() -> int:
    """Worker processes when none are asked for: none on a CPU machine, whose cores train;
    up to 4 per GPU process on a GPU machine, whose cores would otherwise idle."""
    if not torch.cuda.is_available():
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    # The cores this process may use (a job scheduler's share), where the system says.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cores or 1) // local))


class EpochOrder(Sampler):
    """(epoch, position) of every example of an epoch: shuffled by the seed's order stream for
    that epoch, or in order when `seed` is None. `start(epoch)` chooses the epoch; one loader
    (and its workers) serves every epoch."""

    def __init__(self, size: int, seed: int | None):
        self.size, self.seed, self.epoch = size, seed, 0
        #: what a DataLoader draws its workers' seeds from on each pass, and what Accelerate
        #: keeps in step across processes: never torch's global generator, whose draws would
        #: move the dropout of the steps after (and differ between a run and its resumption)
        self.generator = torch.Generator().manual_seed(seed_of(seed or 0, Stream.LOADER))

    def start(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.seed is None:
            order = range(self.size)
        else:
            generator = torch.Generator().manual_seed(seed_of(self.seed, Stream.ORDER, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        return ((self.epoch, i) for i in order)


@dataclass(frozen=True)
class DataFailure:
    """A data error met while reading or collating a batch, carried to the training process
    in place of the batch: an exception raised in a worker would come back wrapped in the
    worker's traceback, and the one-line message users get would be lost in it."""

    message: str


class _Indexed(Dataset):
    """The examples, each given with the epoch and position it was asked for."""

    def __init__(self, examples: Sequence):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Any]:
        epoch, position = key
        try:
            return epoch, position, self.examples[position]
        except VLPruneError as exc:
            return epoch, position, DataFailure(str(exc))


class _SeededCollate:
    """`collate(examples)` with torch's generator seeded from the seed's `stream` keyed by the
    epoch and the examples' positions, restored afterwards."""

    def __init__(self, collate: Callable[[list], Any], seed: int, stream: Stream):
        self.collate, self.seed, self.stream = collate, seed, stream

    def __call__(self, items: list[tuple[int, int, Any]]) -> Any:
        failed = next((e for _, _, e in items if isinstance(e, DataFailure)), None)
        if failed is not None:
            return failed
        epoch = items[0][0]
        positions = (position for _, position, _ in items)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only, as the fork restores: torch.manual_seed would also reseed
            # every accelerator's generator (CUDA's dropout) on each batch, and costs ~1 ms.
            torch.random.default_generator.manual_seed(
                seed_of(self.seed, self.stream, epoch, *positions)
            )
            try:
                return self.collate([example for _, _, example in items])
            except VLPruneError as exc:
                return DataFailure(str(exc))


def raising(loader: Iterable) -> Iterator[Any]:
    """The batches of a loader from `batches`, raising a data error met in making one."""
    for batch in loader:
        if isinstance(batch, DataFailure):
            raise VLPruneError(batch.message)
        yield batch


def _share_feature_cache(workers: int, worker_id: int) -> None:
    """Each worker keeps its share of the per-image feature cache's bound, so that N workers
    hold what one process would."""
    FEATURE_FILES.limit //= workers


def batches(
    examples: Sequence,
    collate: Callable[[list], Any],
    batch_size: int,
    seed: int,
    shuffle: bool,
    workers: int,
) -> tuple[DataLoader, EpochOrder]:
    """A DataLoader of collated batches and the order it draws them in (`start(epoch)` before
    each epoch); iterate it through `raising`. Training batches (`shuffle`) follow the run's
    `seed`; evaluation batches come in order, collated with `EVALUATION_SEED`. Workers stay
    alive between epochs; batches are pinned for a fast copy to a GPU."""
    if not shuffle:
        seed = EVALUATION_SEED
    order = EpochOrder(len(examples), seed if shuffle else None)
    loader = DataLoader(
        _Indexed(examples),
        batch_size=batch_size,
        sampler=order,
        collate_fn=_SeededCollate(collate, seed, Stream.COLLATE if shuffle else Stream.EVALUATE),
        num_workers=workers,
        generator=order.generator,
        worker_init_fn=partial(_share_feature_cache, workers),
        pin_memory=workers > 0 and torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
    return loader, order
