"""Is the embedded world hard enough for pruning to matter?

A tiny backbone with its cached world θ0 is fine-tuned dense on a world task, then masks from
one-shot magnitude pruning of the dense-trained weights and random masks, at each sparsity, are
trained from θ0 (the lottery-ticket recipe). Prints each score and its ratio to dense. Run:

    python benchmarks/world_difficulty.py --backbone uniter --task nlvr2
"""

from __future__ import annotations

import argparse
import time

import torch

from vl_prune import registry
from vl_prune.pruning import GlobalMagnitude, GlobalRandom
from vl_prune.task import VLModel
from vl_prune.train import TrainSettings, evaluate, fit, make_accelerator
from vl_prune.world import embedded_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="uniter")
    parser.add_argument("--task", default="nlvr2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    args = parser.parse_args()

    backbone_class = registry.load("backbones", args.backbone)
    task_class = registry.load("tasks", args.task)
    world = embedded_world()
    task = task_class(world.data(args.task))
    train, dev = task.examples("train"), task.examples("dev")
    settings = TrainSettings(steps=args.steps)

    def run(prune=None) -> tuple[float, VLModel]:
        backbone = world.theta0(backbone_class, args.backbone)
        torch.manual_seed(1)  # the same head φ0 for every run
        model = VLModel(backbone, task.head(backbone))
        if prune is not None:
            prune(backbone.prunable())
        accelerator = make_accelerator(settings)
        model = accelerator.prepare(model)
        fit(model, task, train, settings, accelerator, quiet=True)
        return evaluate(model, task, dev, settings, accelerator), model

    start = time.perf_counter()
    dense, trained = run()
    trained_weights = [getattr(m, n).detach().clone() for m, n in trained.backbone.prunable()]
    print(f"{args.backbone}-tiny on world {args.task} ({task.metric}), {args.steps} steps a run")
    print(f"  dense                 {dense:.3f}")
    for sparsity in args.sparsities:

        def magnitude(params, sparsity=sparsity):
            scores = dict(zip(params, trained_weights, strict=True))
            GlobalMagnitude.prune_group(params, sparsity, importance_scores=scores)

        def random(params, sparsity=sparsity):
            GlobalRandom.prune_group(params, sparsity, seed=0)

        for name, prune in (("magnitude", magnitude), ("random", random)):
            score, _ = run(prune)
            print(f"  {name:9s} {sparsity:4.0%}      {score:.3f}   {score / dense:.3f} of dense")
    print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
