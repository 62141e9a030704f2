"""Does each world recipe train the dense model to its plateau?

"% of dense" is only a finding when dense is converged: a ticket that trains as long as an
under-trained dense model, and inherits what earlier rounds learned, climbs above it. For each
task the dense model is fine-tuned from the world θ0 at the recipe's steps and at twice them,
over several seeds (each its own head φ0, data order and dropout). The recipe is a plateau when
the longer training's mean gains no more than one pooled std on the recipe's (a loss at twice
the steps is overfitting, not the under-training that would inflate "% of dense"). Run:

    python benchmarks/dense_plateau.py --backbone uniter --tasks nlvr2 vqa --seeds 3

`--steps`, `--lr`, `--batch-size` and `--dropout` try another recipe before a world split
adopts it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

from vl_prune import registry
from vl_prune.experiment import Experiment, FindSettings, recipe
from vl_prune.seeds import over_seeds, seed_list


def dense_scores(
    backbone: str, task: str, steps: int, seeds: list[int], **changes: float
) -> tuple[dict, float]:
    """The dense model's scores over `seeds` after `steps` steps of the world recipe (with
    `changes`); seconds a run."""
    train = replace(recipe(task, world=True, backbone=backbone), steps=steps, **changes)
    settings = FindSettings(backbone, task, train=train)
    experiment = Experiment(settings)
    started, scores = time.perf_counter(), []
    for seed in seeds:
        name = f"{task} dense, {steps} steps, seed {seed}"
        score, _ = experiment.train(experiment.fresh(seed), name, seed=seed, quiet=True)
        scores.append(score)
    return over_seeds(scores), (time.perf_counter() - started) / len(seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="uniter")
    world_tasks = sorted(p.name for p in registry.plugins("world_splits") if p.name != "pretrain")
    parser.add_argument("--tasks", nargs="+", default=world_tasks)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="Steps to test [the world recipe's].")
    parser.add_argument("--lr", type=float, help="Learning rate to test [the world recipe's].")
    parser.add_argument("--batch-size", type=int, help="Batch size to test [the recipe's].")
    parser.add_argument("--dropout", type=float, help="Dropout to test [the recipe's].")
    parser.add_argument("--threads", type=int, help="CPU threads a run trains on [torch's].")
    args = parser.parse_args()
    changes = {
        name: value
        for name, value in (
            ("lr", args.lr),
            ("batch_size", args.batch_size),
            ("dropout", args.dropout),
            ("threads", args.threads),
        )
        if value is not None
    }
    seeds = seed_list(0, args.seeds)

    print(f"{args.backbone}-tiny, dense on the world, {args.seeds} seeds (mean ± std)")
    print("| task | recipe steps | at the recipe | at twice the steps | change | plateau |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        steps = args.steps or recipe(task, world=True, backbone=args.backbone).steps
        once, seconds = dense_scores(args.backbone, task, steps, seeds, **changes)
        twice, _ = dense_scores(args.backbone, task, 2 * steps, seeds, **changes)
        pooled = math.sqrt((once["std"] ** 2 + twice["std"] ** 2) / 2)
        change = twice["score"] - once["score"]
        verdict = "yes" if change <= pooled else "no"
        print(
            f"| {task} | {steps} ({seconds:.0f} s a run) | {once['score']:.3f} ± "
            f"{once['std']:.3f} | {twice['score']:.3f} ± {twice['std']:.3f} | {change:+.3f} | "
            f"{verdict} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
