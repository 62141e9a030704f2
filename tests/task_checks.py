"""What every task's tests check alike: its world is reproducible from a seed, and uniter-tiny
trains and scores on it through `vl_prune.train`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vl_prune.task import Task, VLModel
from vl_prune.train import TrainSettings, evaluate, fit, make_accelerator
from vl_prune.world import WorldSplit
from vl_prune_plugins.backbones.uniter import Uniter


def written_twice(split: WorldSplit, folder: Path, seed: int) -> list[Path]:
    """The files of the task's world split written twice with one seed (paths relative to the
    split), after asserting the two writes are byte-identical."""
    for name in ("a", "b"):
        split.write(folder / name, seed)
    files = sorted(p.relative_to(folder / "a") for p in (folder / "a").rglob("*.*"))
    for name in files:
        assert (folder / "a" / name).read_bytes() == (folder / "b" / name).read_bytes()
    return files


def train_briefly(task: Task, eval_examples: list, steps: int) -> float:
    """A few steps of fit on the task's training split from a seeded uniter-tiny, after asserting
    every loss is finite; the score of `eval_examples`."""
    torch.manual_seed(0)
    backbone = Uniter.build("tiny")
    model = VLModel(backbone, task.head(backbone))
    settings = TrainSettings(steps=steps, batch_size=8, eval_batch_size=16)
    accelerator = make_accelerator(settings)
    prepared = accelerator.prepare(model)
    losses = fit(prepared, task, task.examples(task.splits[0]), settings, accelerator, quiet=True)
    assert len(losses) == steps and all(np.isfinite(losses))
    return evaluate(prepared, task, eval_examples, settings, accelerator)
