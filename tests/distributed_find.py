"""One rank of a two-process job, launched by tests/test_distributed.py through
`python -m torch.distributed.run --nproc_per_node 2`:

1. `vlprune find ARGS…` (the CLI, in this process), recording the world size of every
   Accelerator the run made and a digest of the model (weights and masks) after each round's
   training;
2. the setup of an embedded-world find (`Experiment`) in `$VL_PRUNE_HOME`, which the test
   leaves without the NLVR2 world split and without θ0: both are built here, by the job.

Every file this rank writes meanwhile is recorded: Python-level writes through an audit hook,
and the writers that open files in C (`torch.save`, safetensors' `save_file`) at their Python
entry points. The records go to OUT/rank<N>.json.

Usage: python distributed_find.py OUT FIND_ARGS…
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import vl_prune_plugins.world.splits.nlvr2 as nlvr2
import vl_prune_plugins.world.splits.pretrain as pretrain
from vl_prune.train import TrainSettings
from vl_prune_plugins.world.synthetic import SyntheticWorld
from vl_prune_plugins.world.theta0 import pretrained_tiny

#: the world split sizes of the job (and of the test's reference θ0)
WORLD = {"train": 48, "dev": 24}
#: pre-training of the embedded θ0, kept tiny
THETA0 = TrainSettings(steps=3, batch_size=8, lr=1e-3, seed=5)


def patch(setattr=setattr) -> None:
    """Small world splits and a tiny θ0 pre-training (`setattr`: monkeypatch's in a test)."""
    setattr(nlvr2, "WORLD_SIZES", WORLD)
    setattr(pretrain, "WORLD_SIZES", WORLD)
    setattr(SyntheticWorld, "theta0", lambda world, cls, name: pretrained_tiny(cls, name, THETA0))


def digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of `model` (weights, `weight_orig`, `weight_mask`) by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pruned(model: torch.nn.Module) -> int:
    return sum(int((~m.bool()).sum()) for n, m in model.state_dict().items() if n.endswith("_mask"))


def main(out: Path, find_args: list[str]) -> None:
    import safetensors.torch

    import vl_prune.experiment as experiment
    import vl_prune.train_state as train_state
    from vl_prune import registry
    from vl_prune.experiment import Experiment, FindSettings
    from vl_prune_cli.main import cli

    record = {"accelerators": [], "rounds": [], "find_writes": [], "setup_writes": []}
    writes = record["find_writes"]

    def wrote(event: str, path) -> None:
        if not isinstance(path, int):
            writes.append([event, os.path.abspath(os.fsdecode(path))])

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if mode is None:
                writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
            else:
                writing = any(c in mode for c in "wax+")
            if writing and path is not None:
                wrote("open", path)
        elif event == "os.rename":  # os.replace too
            wrote(event, args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            wrote(event, args[0])

    def writer(event: str, save):
        def recorded(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                wrote(event, f)
            return save(obj, f, *args, **kwargs)

        return recorded

    torch.save = writer("torch.save", torch.save)
    safetensors.torch.save_file = writer("save_file", safetensors.torch.save_file)
    train_state.save_file = writer("save_file", train_state.save_file)

    make_accelerator = experiment.make_accelerator

    def recorded_accelerator(*args, **kwargs):
        accelerator = make_accelerator(*args, **kwargs)
        record["accelerators"].append(
            {"num_processes": accelerator.num_processes, "index": accelerator.process_index}
        )
        return accelerator

    experiment.make_accelerator = recorded_accelerator
    train = Experiment.train

    def recorded_train(self, model, description, *args, **kwargs):
        score, trained = train(self, model, description, *args, **kwargs)
        record["rounds"].append(
            {"score": score, "digest": digest(trained), "pruned": pruned(trained)}
        )
        return score, trained

    Experiment.train = recorded_train
    patch()
    # Imported before recording: importing transformers probes the system (ldconfig through
    # /dev/null, inductor's cache folder), which is no write of the find's.
    registry.load("backbones", "uniter")
    sys.addaudithook(audit)

    cli.main(args=find_args, prog_name="vlprune", standalone_mode=False)
    writes = record["setup_writes"]
    embedded = Experiment(FindSettings(backbone="uniter", task="nlvr2"))
    record["theta0_fingerprint"] = embedded.fingerprint
    writes = []  # stop recording: what follows is this script's own output
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
