"""Two processes on the CPU form one job: `vlprune find` under
`python -m torch.distributed.run --nproc_per_node 2` (gloo), run by tests/distributed_find.py.

The traps this guards against leave no error: an Accelerate state made without `cpu=True` on a
machine without GPUs runs each rank as its own one-process job, two trainings that both look
fine. So the test asserts the world size every Accelerator saw, that both ranks hold the same
weights and masks after every round, and what each rank wrote.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import distributed_find
import pytest
import torch
from safetensors.torch import save_file

from vl_prune.ticket import current_weights, fingerprint
from vl_prune.world import embedded_world
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.world.splits import nlvr2 as nlvr2_world

SCRIPT = Path(distributed_find.__file__)
#: what a save of the training state writes on every rank, rank 1 included: that rank's
#: random generator states (rank 0 makes the save's folder)
RANK1_SAVE_STATE = [
    # in the run's rounds, and in the dense rounds it shares (runs/dense/<name>/)
    ("save_file", r"(dense/)?[^/]+/seed_\d+/round_\d\d/checkpoint/step_\d{7}/rng_1\.safetensors"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The records of both ranks, the run folder and the job's `$VL_PRUNE_HOME`; and θ0 as a
    single process builds it (the job must build the same one)."""
    root = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as patch:
        distributed_find.patch(patch.setattr)
        nlvr2_world.write(root / "nlvr2")
        torch.manual_seed(0)
        save_file(Uniter.build("tiny").state_dict(), root / "theta0.safetensors")
        patch.setenv("VL_PRUNE_HOME", str(root / "reference"))
        # Float sums, hence θ0's bits, depend on the thread count: use the job's.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            reference = embedded_world().theta0(Uniter, "uniter")
        finally:
            torch.set_num_threads(threads)
    # The job's θ0 is built in a process of its own, which sees none of the patches: give it
    # the small pre-training world the reference was built on. No NLVR2 world, no θ0 yet.
    home = root / "home"
    shutil.copytree(root / "reference" / "world", home / "world")
    runs = root / "runs"
    find = [
        *("find", "--model", "uniter", "--task", "nlvr2", "--checkpoint"),
        *(str(root / "theta0.safetensors"), "--data", str(root / "nlvr2")),
        *("--schedule", "geometric", "--rate", "0.5", "--sparsity", "0.75"),
        *("--steps", "2", "--batch-size", "8", "--checkpoint-every", "1"),
        *("--runs", str(runs), "--quiet", "--json"),
    ]
    env = {
        **os.environ,
        "VL_PRUNE_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, "--master_port", str(free_port()), str(SCRIPT), str(root), *find],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = root / "job.log"
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"the job failed; every rank's output is in {log}"
    records = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    (run,) = runs.glob("uniter-nlvr2-*")
    expected = fingerprint(current_weights(reference, reference.prunable_names()))
    return {"ranks": records, "run": run, "home": home, "theta0_fingerprint": expected}


def test_every_accelerator_saw_both_processes(job):
    for rank, record in enumerate(job["ranks"]):
        assert record["accelerators"], "the run made no Accelerator"
        for accelerator in record["accelerators"]:
            assert accelerator == {"num_processes": 2, "index": rank}


def test_both_ranks_hold_the_same_weights_and_masks_after_every_round(job):
    first, second = job["ranks"]
    # The dense round, then the geometric schedule's 50% and 75%.
    assert len(first["rounds"]) == 3
    assert first["rounds"] == second["rounds"]
    pruned = [r["pruned"] for r in first["rounds"]]
    assert 0 == pruned[0] < pruned[1] < pruned[2]
    assert len({r["digest"] for r in first["rounds"]}) == 3
    report = json.loads((job["run"] / "report.json").read_text())
    assert [r["score"] for r in report["rounds"]] == [r["score"] for r in first["rounds"]]


def relative(path: str, root: Path) -> str | None:
    path = Path(path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else None


def test_only_rank0_writes_run_files_except_its_own_save_state_files(job):
    run = job["run"]
    rank0, rank1 = (record["find_writes"] for record in job["ranks"])
    written = {relative(path, run) for _, path in rank0}
    # The recorder sees rank 0's writes: the run's outputs and its save_state files.
    assert {"report.json", "ticket.safetensors"} <= written
    assert any(re.fullmatch(r"seed_\d+/round_02/metrics\.json", p or "") for p in written)
    assert any(
        re.fullmatch(r"seed_\d+/round_\d\d/checkpoint/step_\d{7}/model\.safetensors", p or "")
        for p in written
    )
    saves = {path for event, path in rank1 if event == "save_file"}
    assert saves, "rank 1 saved no random states: no save_state ran with two ranks"
    for event, path in rank1:
        name = relative(path, run.parent)
        assert name is not None and any(
            event == allowed and re.fullmatch(pattern, name)
            for allowed, pattern in RANK1_SAVE_STATE
        ), f"rank 1 wrote {path} ({event})"


def test_rank0_alone_builds_the_embedded_world_and_theta0(job):
    home = job["home"]
    rank0, rank1 = (record["setup_writes"] for record in job["ranks"])
    assert rank1 == []
    built = {relative(path, home) for event, path in rank0 if event == "os.rename"}
    assert any(name and name.startswith("world/nlvr2-") for name in built)
    assert len(list((home / "theta0").glob("uniter-tiny-*.safetensors"))) == 1


def test_theta0_built_by_the_job_is_the_one_a_single_process_builds(job):
    # Not a two-process training: its batches would be split between the ranks.
    for record in job["ranks"]:
        assert record["theta0_fingerprint"] == job["theta0_fingerprint"]
