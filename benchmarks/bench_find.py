"""`vlprune find` against its anchor, the dense model: step time, peak memory, wall time.

1. One training step (forward, backward, AdamW) of UNITER-base-shaped NLVR2 pairs, pruned to
   90% by the ticket machinery and trained as `fit` trains it (zeros held in place), against the
   same dense model, the same model trained through its prune hooks, and the same masks applied
   by torch's own prune API (`prune.custom_from_mask`); steps interleaved, median of many.
2. Peak memory of a training step, each variant in a fresh process.
3. The wall time of the default job, `vlprune find --model uniter --task nlvr2`, in a fresh
   `$VL_PRUNE_HOME` (first run: world data and θ0 built too) unless --skip-find.
4. With --pair: the wall time of that job alone and of two of it started together (in one warm
   home, two run folders, so both train), with the CLI's OpenMP wait settings and with
   OpenMP's own, and two at `--threads 1`; `--pair-steps N` shortens each job's fine-tunings
   to N steps.

    python benchmarks/bench_find.py                 # about ten minutes on 2 cores
    python benchmarks/bench_find.py --layers 2 --skip-find   # a quick look
    python benchmarks/bench_find.py --steps 0 --skip-find --pair --pair-steps 60
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

import torch
from torch.nn.utils import prune

from vl_prune.backbone import VLBatch
from vl_prune.pruning import GlobalMagnitude
from vl_prune.pruning.layout import zeros_in_place
from vl_prune.task import VLModel
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.tasks.nlvr2 import PairedHead

TEXT, REGIONS, IMG_DIM = 24, 36, 2048


def model(layers: int, sparsity: float, by_torch: bool = False) -> VLModel:
    """The model, pruned by vl_prune's bool masks, or with the same masks by torch's own API."""
    torch.manual_seed(0)
    backbone = Uniter("base", num_hidden_layers=layers, type_vocab_size=3)
    if sparsity:
        GlobalMagnitude.prune_group(backbone.prunable(), sparsity)
    if by_torch:
        for module, name in backbone.prunable():
            mask = getattr(module, name + "_mask").float()
            prune.remove(module, name)
            prune.custom_from_mask(module, name, mask)
    return VLModel(backbone, PairedHead(backbone.hidden_size))


def batch(size: int, image_type: int) -> VLBatch:
    generator = torch.Generator().manual_seed(image_type)
    out = VLBatch(
        input_ids=torch.randint(1000, 28000, (size, TEXT), generator=generator),
        attention_mask=torch.ones(size, TEXT, dtype=torch.long),
        token_type_ids=torch.zeros(size, TEXT, dtype=torch.long),
        image_type=image_type,
    )
    out.region_feats = torch.randn(size, REGIONS, IMG_DIM, generator=generator)
    out.region_boxes = torch.rand(size, REGIONS, 6, generator=generator)
    out.region_mask = torch.ones(size, REGIONS, dtype=torch.long)
    return out


class Step:
    """One optimizer step of a model on fixed pairs: through its prune hooks, or as `fit` trains
    a pruned model (`in_place`)."""

    def __init__(self, net: VLModel, size: int, in_place: bool = False):
        self.net = net
        self.inputs = [batch(size, 1), batch(size, 2)]
        self.targets = torch.randint(0, 2, (size,))
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.98))
        self.layout = ExitStack()  # held for the benchmark's life, as for a whole `fit`
        self.mask_gradients = (
            self.layout.enter_context(zeros_in_place(net)) if in_place else lambda: None
        )

    def __call__(self) -> float:
        start = time.perf_counter()
        logits = self.net.head(self.net.backbone, self.inputs)
        torch.nn.functional.cross_entropy(logits, self.targets).backward()
        self.mask_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return time.perf_counter() - start


#: name: (sparsity, masks applied by torch's own API, trained as `fit` trains)
VARIANTS = {
    "dense": (0.0, False, False),
    "vl_prune": (None, False, True),
    "prune hooks": (None, False, False),
    "torch prune": (None, True, False),
}


def _peak(sparsity: float, by_torch: bool, in_place: bool, layers: int, size: int) -> int:
    """Peak resident memory of building the model and training two steps, above the
    interpreter's own (weights, masks, AdamW state and activations all count)."""
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    step = Step(model(layers, sparsity, by_torch), size, in_place)
    step()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def _in_fresh_process(*args) -> int:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="NLVR2 pairs per step")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--skip-find", action="store_true")
    parser.add_argument("--pair", action="store_true", help="one find alone against two at once")
    parser.add_argument("--pair-steps", type=int, help="fine-tuning steps of --pair's finds")
    args = parser.parse_args()
    if args.steps:
        training_steps(args)
    if not args.skip_find:
        first_find()
    if args.pair:
        pair(args.pair_steps)


def training_steps(args: argparse.Namespace) -> None:
    """Items 1 and 2: a training step's time and peak memory per variant."""
    settings = {
        name: (args.sparsity if sparsity is None else sparsity, by_torch, in_place)
        for name, (sparsity, by_torch, in_place) in VARIANTS.items()
    }

    # Memory first: a spawned process inherits its parent's peak resident size.
    peak = {name: _in_fresh_process(*s, args.layers, args.batch) for name, s in settings.items()}
    steps = {
        name: Step(model(args.layers, sparsity, by_torch), args.batch, in_place)
        for name, (sparsity, by_torch, in_place) in settings.items()
    }
    for step in steps.values():  # warm-up: allocator, AdamW state
        step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step())
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"UNITER-base shape, {args.layers} layers, {args.batch} NLVR2 pairs a step, CPU; "
        f"pruned to {args.sparsity:.0%}; median of {args.steps} interleaved steps"
    )
    print(f"  {'':12} {'step':>8} {'/ dense':>8} {'peak memory':>12} {'/ dense':>8}")
    for name in steps:
        print(
            f"  {name:12} {median[name]:7.3f}s {median[name] / median['dense']:7.3f}x "
            f"{peak[name] / 2**20:+10.0f}MiB {peak[name] / peak['dense']:7.3f}x"
        )
    print(
        f"  vl_prune / torch prune: step {median['vl_prune'] / median['torch prune']:.3f}x, "
        f"peak memory {peak['vl_prune'] / peak['torch prune']:.3f}x"
    )


def first_find() -> None:
    """Item 3: the default job from a fresh home."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "VL_PRUNE_HOME": os.path.join(scratch, "home")}
        start = time.perf_counter()
        subprocess.run(
            [
                *(sys.executable, "-m", "vl_prune_cli.main", "find", "--model", "uniter"),
                *("--task", "nlvr2", "--runs", os.path.join(scratch, "runs"), "--quiet"),
            ],
            env=env,
            check=True,
        )
        wall = time.perf_counter() - start
    print(f"  vlprune find --model uniter --task nlvr2, first run: {wall / 60:.1f} min")


def pair(steps: int | None) -> None:
    """Item 4: one find alone, then two started together, under each OpenMP wait setting."""
    job = ["find", "--model", "uniter", "--task", "nlvr2", "--quiet"]
    job += [] if steps is None else ["--steps", str(steps)]
    with tempfile.TemporaryDirectory() as scratch:
        home = os.path.join(scratch, "home")
        _finds(job, home, os.path.join(scratch, "warm"), 1, {})  # world and θ0, built once
        print(f"vlprune {' '.join(job)}: wall time, warm home (alone | each of two together)")
        alones = []
        for label, spin in (("vlprune's wait setting", None), ("OpenMP's default", "300000")):
            extra = {} if spin is None else {"GOMP_SPINCOUNT": spin}
            runs = os.path.join(scratch, label.split()[0])  # new run folders: nothing skipped
            (alone,) = _finds(job, home, f"{runs}-alone", 1, extra)
            together = _finds(job, home, f"{runs}-together", 2, extra)
            alones.append(alone)
            print(
                f"  {label:24} {alone:6.1f} s | {max(together):6.1f} s  "
                f"({max(together) / alone:.2f}x)"
            )
        # Two jobs of one thread each, against one of torch's count alone: the work per second.
        together = _finds([*job, "--threads", "1"], home, os.path.join(scratch, "t1"), 2, {})
        print(
            f"  {'two at --threads 1':24} {alones[0]:6.1f} s | {max(together):6.1f} s  "
            f"({max(together) / alones[0]:.2f}x; {2 * alones[0] / max(together):.2f}x the work "
            "of the two one after the other)"
        )


def _finds(job: list[str], home: str, runs: str, count: int, extra: dict) -> list[float]:
    """Wall seconds of `count` copies of `vlprune JOB` started together, each its own runs."""
    env = {**os.environ, "VL_PRUNE_HOME": home, **extra}
    env.pop("OMP_WAIT_POLICY", None)
    if not extra:
        env.pop("GOMP_SPINCOUNT", None)  # the CLI sets its own
    start = time.perf_counter()
    command = [sys.executable, "-m", "vl_prune_cli.main", *job]
    processes = [
        subprocess.Popen([*command, "--runs", f"{runs}{i}"], env=env, stdout=subprocess.DEVNULL)
        for i in range(count)
    ]
    walls = []
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"vlprune {' '.join(job)} failed")
        walls.append(time.perf_counter() - start)
    return walls


if __name__ == "__main__":
    main()
