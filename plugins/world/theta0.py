"""θ0 for any backbone class: its tiny preset pre-trained on the world's captions.

MLM + ITM (+ MRFR for region backbones), through the `pretrain` task's reader, head and loss:
a real θ0, built on first use, deterministically, and cached under `$VL_PRUNE_HOME/theta0/`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from vl_prune.backbone import Backbone
from vl_prune.seeds import SCHEME
from vl_prune.task import VLModel
from vl_prune.train import OPTIMIZER, TrainSettings
from vl_prune_plugins.world import VERSION
from vl_prune_plugins.world.vocabulary import words

# Pre-training of the tiny presets' θ0; changing it changes every cached θ0 (and its name).
# 1,600 steps of 32 (about 50 s for uniter on 2 cores, once per home): at 400, θ0 knew so
# little that every task had to learn the world while fine-tuning, and dense kept climbing for
# 30 epochs (benchmarks/dense_plateau.py); the paper's premise is a model that already knows it.
THETA0 = TrainSettings(steps=1600, batch_size=32, lr=1e-3, seed=0)
#: the threads θ0 is always pre-trained with, whatever the caller's: float sums, hence θ0's
#: bits, depend on the thread count, and every process and machine of a job must find the same
#: θ0 under one name
THREADS = 2


def pretrained_tiny(
    backbone_class: type[Backbone], name: str, settings: TrainSettings = THETA0
) -> Backbone:
    """`backbone_class`'s tiny preset pre-trained on the world (`name`: its registry name, in
    the cached file's name); later calls load the cached weights."""
    from safetensors.torch import load_file

    from vl_prune.distributed import run_alone
    from vl_prune.home import build_once, home, local_main_first
    from vl_prune.world import embedded_world

    torch.manual_seed(settings.seed)
    backbone = backbone_class.build("tiny")
    path = home() / "theta0" / file_name(name, backbone, settings)
    # Every rank asks for the captions, θ0 cached or not: `data` holds a barrier of its own,
    # which must not meet the one below, and the machines of a job may have cached different
    # things.
    captions = embedded_world().data("pretrain", seed=settings.seed)
    # In a multi-process job one process per machine builds it, the others wait; every rank
    # passes the barrier, built or not (see `cached_folder`).
    with local_main_first() as builder:
        if builder and not path.is_file():
            with build_once(path) as needed:
                if needed:
                    # In a process of its own: inside a multi-process job Accelerate would
                    # split the batches across the ranks and give another θ0 under the same
                    # name, and in this process it would fix the precision of the fine-tuning
                    # that follows to θ0's.
                    run_alone(_pretrain, backbone_class, name, settings, captions, path, THREADS)
    backbone.load_state_dict(load_file(path))
    return backbone


def file_name(name: str, backbone: Backbone, settings: TrainSettings) -> str:
    """The cached θ0's file name: everything that decides its weights is in its digest, so a
    change of any of them builds a new θ0."""
    from vl_prune_plugins.world.splits.pretrain import WORLD_SIZES

    recipe = repr(
        (
            settings.identity(),
            sorted(backbone.state_dict()),
            words(),
            WORLD_SIZES,
            VERSION,
            OPTIMIZER,
            SCHEME,
            THREADS,
        )
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{name}-tiny-{digest}.safetensors"


def _pretrain(
    backbone_class: type[Backbone],
    name: str,
    settings: TrainSettings,
    captions: Path,
    path: Path,
    threads: int,
) -> None:
    """Pre-train a new tiny backbone (seeded as `pretrained_tiny` seeds its own) on the world's
    `captions` folder with `threads` threads, and write it to `path`."""
    from safetensors.torch import save

    from vl_prune.files import atomic_write
    from vl_prune.train import fit, make_accelerator
    from vl_prune_plugins.tasks.pretrain import Pretrain

    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    backbone = backbone_class.build("tiny")
    task = Pretrain(captions)
    model = VLModel(backbone, task.head(backbone))
    accelerator = make_accelerator(settings)
    fit(
        accelerator.prepare(model),
        task,
        task.examples("train"),
        settings,
        accelerator,
        description=f"pre-training {name}-tiny",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic_write(path, save(state))
