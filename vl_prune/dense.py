"""Each seed's dense model of a task, fine-tuned once per runs folder and read by every run that
starts from it.

`find`'s runs that differ only in how they prune (IMP, one-shot, random, their schedules) train
the same dense round, and `transfer` scores its tickets against the same fine-tuning: each is
trained once, in `runs/dense/<backbone>-<task>-<digest>/`, the digest taken over what decides
it (the settings but the pruning ones and the seed, the preset, the data, θ0 and the process
count). The folder is laid out as a run with only its dense round (`seed_<s>/round_00/`): its
weights, `metrics.json` once finished, and its training state while it trains, so a killed
training resumes and `vlprune runs clean` treats it as it treats a run's rounds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vl_prune.checkpoint import reason
from vl_prune.distributed import job_lock, process_state
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment
from vl_prune.files import atomic_write
from vl_prune.pruning.layout import load_plain_state
from vl_prune.task import VLModel
from vl_prune.train import Checkpoints

#: the settings that only steer `find`'s rounds, not one fine-tuning
ROUND_FIELDS = ("method", "schedule", "rate", "sparsity", "rewind_step", "one_shot")
METRICS = "metrics.json"
CHECKPOINT = "checkpoint"
WEIGHTS = "weights.safetensors"


def training_identity(experiment: Experiment) -> dict[str, Any]:
    """What decides one fine-tuning of `experiment` but its seed."""
    settings = experiment.settings
    identity = {k: v for k, v in settings.identity().items() if k not in ROUND_FIELDS}
    del identity["train"]["seed"]
    return {
        **identity,
        "preset": experiment.preset,
        "data": experiment.data_fingerprint,
        "weights_fingerprint": experiment.fingerprint,
        # --batch-size is per process: another process count is another training
        "processes": process_state().num_processes,
    }


class DenseRounds:
    """The dense rounds of one task and training, one per seed, under `runs/dense/`."""

    def __init__(
        self,
        experiment: Experiment,
        runs: str | Path = "runs",
        checkpoint_every: int = 50,
        log: Callable[[str], None] = lambda line: None,
    ):
        self.experiment, self.checkpoint_every, self.log = experiment, checkpoint_every, log
        self.config = training_identity(experiment)
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        settings = experiment.settings
        self.folder = Path(runs) / "dense" / f"{settings.backbone}-{settings.task}-{digest[:10]}"

    def round_folder(self, seed: int) -> Path:
        return self.folder / f"seed_{seed}" / "round_00"

    def train(
        self, seed: int, description: str, quiet: bool = False
    ) -> tuple[float, VLModel, float]:
        """Seed `seed`'s dense model fine-tuned, its score, and the seconds spent training it:
        trained here, or read (0 seconds) where an earlier run trained it. A finished round is
        read without the folder's lock, so a job of several processes, which does not wait for
        a lock, reads it while another job trains another seed."""
        folder = self.round_folder(seed)
        if self._finished(folder):
            return self._read(folder, seed, description)
        state = process_state()
        with job_lock(self.folder):  # one job at a time trains a task's dense rounds
            if self._finished(folder):  # trained while this job waited
                return self._read(folder, seed, description)
            if state.is_main_process:
                from vl_prune.cleanup import open_run_folder  # which reads this module's names

                open_run_folder(self.folder, self.config, self.log)
                folder.mkdir(parents=True, exist_ok=True)
            state.wait_for_everyone()
            self.log(f"{description}: training at sparsity 0.0% (dense)")
            started = time.perf_counter()
            score, trained = self.experiment.train(
                self.experiment.fresh(seed),
                description,
                seed=seed,
                quiet=quiet,
                checkpoints=Checkpoints(folder / CHECKPOINT, self.checkpoint_every),
            )
            seconds = round(time.perf_counter() - started, 1)
            if state.is_main_process:
                from safetensors.torch import save

                # Cloned: tied tensors would be refused, and GPU ones are copied out.
                weights = {k: v.detach().cpu().clone() for k, v in trained.state_dict().items()}
                # The weights first: a round is finished once its metrics.json exists.
                atomic_write(folder / WEIGHTS, save(weights))
                record = {"score": score, "seconds": seconds}
                atomic_write(folder / METRICS, json.dumps(record, indent=2).encode())
                shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
            state.wait_for_everyone()
            return score, trained, seconds

    def _finished(self, folder: Path) -> bool:
        """Whether the round is finished, as the main process sees it: every process of a job
        takes the same path (one process training alone would hang the job)."""
        from accelerate.utils import broadcast_object_list

        state = process_state()
        seen = [(folder / METRICS).is_file()]
        if state.num_processes > 1:
            broadcast_object_list(seen)
        return seen[0]

    def _read(self, folder: Path, seed: int, description: str) -> tuple[float, VLModel, float]:
        """A finished round: its score, and `seed`'s fresh model holding its weights, where and
        as training leaves it (on the job's device, in eval mode: random masks are drawn on the
        weights' device)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        metrics = folder / METRICS
        try:
            score = json.loads(metrics.read_text())["score"]
            if not isinstance(score, (int, float)):
                raise TypeError(f"score is {score!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise VLPruneError(
                f"{metrics}: damaged ({reason(exc)}); delete {folder} to train it again"
            ) from exc
        model = self.experiment.fresh(seed)
        try:
            load_plain_state(model, load_file(folder / WEIGHTS))
        except (OSError, SafetensorError, VLPruneError) as exc:
            raise VLPruneError(
                f"{folder / WEIGHTS}: damaged ({reason(exc)}); delete {folder} to train it again"
            ) from exc
        self.log(f"{description}: the dense model trained earlier, read from {folder}")
        return float(score), model.to(process_state().device).eval(), 0.0
