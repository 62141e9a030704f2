"""The job this process belongs to (rank, world size), made the one way that sees every rank.

Accelerate fixes a process's distributed state the first time anything asks for it
(`PartialState`, `Accelerator`). Asked without `cpu=True` on a machine without GPUs, it ignores
the launcher (torchrun, `accelerate launch`) and every rank runs alone: N independent trainings
that all look fine. So vl_prune asks only through `process_state`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from vl_prune.errors import VLPruneError


def process_state(cpu: bool | None = None):
    """Accelerate's `PartialState`, on the CPU (gloo) when there is no GPU or `cpu` says so."""
    import torch
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes == 1 and launched > 1:
        raise VLPruneError(
            f"launched as one of {launched} processes, but Accelerate runs this one alone: "
            "something made its state before vl_prune did, without cpu=True on a machine "
            "without GPUs"
        )
    return state


#: what makes Accelerate see a multi-process job (torchrun / accelerate launch, and MPI)
JOB_VARIABLES = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
#: the launchers' own settings (FSDP, DeepSpeed, dynamo, elastic agent), not the child's
LAUNCHER_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_")


def run_alone(function: Callable[..., None], *args: Any) -> None:
    """`function(*args)` in a new Python process that is no part of this job: for work whose
    result must not depend on how many processes a job has (inside the job, Accelerate would
    split it across every rank). Arguments go by pickle, so classes among them must be importable
    by name (not defined in `__main__` or a notebook); a failure raises here."""
    child = multiprocessing.get_context("spawn").Process(target=_alone, args=(function, *args))
    try:
        child.start()
    except Exception as exc:  # pickling the arguments, or a daemonic caller
        raise VLPruneError(
            f"{function.__qualname__} cannot run in a process of its own: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    child.join()
    if child.exitcode != 0:
        raise VLPruneError(
            f"{function.__qualname__} failed in its own process (exit code {child.exitcode}); "
            "its error is printed above"
        )


def _alone(function: Callable[..., None], *args: Any) -> None:
    for name in list(os.environ):
        if name in JOB_VARIABLES or name.startswith(LAUNCHER_PREFIXES):
            del os.environ[name]
    function(*args)


@contextmanager
def job_lock(target: Path) -> Iterator[None]:
    """`target`'s lock (`vl_prune.locks`), held by the job's main process for the block. A
    one-process job waits for another holder; in a job of several, the other ranks could only
    wait at a barrier, which times out (30 min on gloo) with a traceback, so a busy target
    stops every rank at once with one line naming its holder."""
    from accelerate.utils import broadcast_object_list

    from vl_prune.locks import Busy, locked

    state = process_state()
    alone = state.num_processes == 1
    with ExitStack() as held:
        refused = [None]
        if state.is_main_process:
            try:
                held.enter_context(locked(target, wait=alone))
            except Busy as busy:
                refused = [str(busy)]
        if not alone:
            broadcast_object_list(refused)
        if refused[0] is not None:
            raise VLPruneError(f"{refused[0]}; a job of several processes does not wait")
        yield
