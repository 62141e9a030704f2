"""Run folders and the cache shared by processes and survived by crashes: one process at a time
(locks), nothing unpickled on resume, damaged resume state refused in one line, leftovers of
killed runs removed, and `vlprune runs clean`."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import vl_prune_plugins.tasks.nlvr2 as nlvr2
import vl_prune_plugins.world.splits.nlvr2 as nlvr2_world
from vl_prune.errors import VLPruneError
from vl_prune.locks import lock_file, locked, owner
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter

WORLD = {"train": 48, "dev": 24}
PYTHON = [sys.executable, "-c"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A small NLVR2 world split and a tiny UNITER checkpoint: no world or θ0 is ever built."""
    root = tmp_path_factory.mktemp("inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2_world, "WORLD_SIZES", WORLD)
        nlvr2_world.write(root / "nlvr2")
    torch.manual_seed(0)
    save_file(Uniter.build("tiny").state_dict(), root / "uniter-tiny.safetensors")
    return root / "nlvr2", root / "uniter-tiny.safetensors"


def find_args(inputs, runs: Path, *extra: str) -> list[str]:
    data, checkpoint = inputs
    return [
        *("find", "--model", "uniter", "--task", "nlvr2", "--checkpoint", str(checkpoint)),
        *("--data", str(data), "--batch-size", "8", "--steps", "6", "--sparsity", "0.2"),
        *("--checkpoint-every", "2", "--runs", str(runs), *extra),
    ]


@pytest.fixture(scope="module")
def interrupted(inputs, tmp_path_factory) -> Path:
    """The runs folder of a find whose round 1 stopped at step 4, its step-2 save kept."""
    runs = tmp_path_factory.mktemp("interrupted") / "runs"
    loss, calls = nlvr2.Nlvr2.loss, {"n": 0}

    def poisoned(self, logits, targets):
        calls["n"] += 1
        value = loss(self, logits, targets)
        return value * float("nan") if calls["n"] > 9 else value  # round 0: 6 steps

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2.Nlvr2, "loss", poisoned)
        result = CliRunner().invoke(cli, find_args(inputs, runs, "--quiet"))
    assert result.exit_code == 2 and "loss became nan" in result.output
    return runs


@pytest.fixture
def resumable(interrupted, tmp_path) -> Path:
    """A copy of the interrupted runs folder; its save of round 1 at step 2."""
    runs = tmp_path / "runs"
    shutil.copytree(interrupted, runs)
    (save,) = runs.glob("*/seed_*/round_01/checkpoint/step_0000002")
    return runs, save


def resume(inputs, runs: Path):
    return subprocess.run(
        [sys.executable, "-m", "vl_prune_cli.main", *find_args(inputs, runs, "--quiet")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlprune: error:"), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert "Traceback" not in result.stdout + result.stderr


class Payload:
    """Unpickling it runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_saved_state_is_safetensors_and_json_only(resumable):
    _, save = resumable
    names = sorted(p.name for p in save.iterdir())
    assert names == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng_0.safetensors",
        "training.json",
    ]


@pytest.mark.parametrize("where", ["custom_checkpoint_0.pkl", "rng_0.safetensors"])
def test_a_crafted_pickle_in_a_run_folder_never_runs(inputs, resumable, tmp_path, where):
    runs, save = resumable
    marker = tmp_path / "payload-ran"
    (save / where).write_bytes(pickle.dumps(Payload(marker)))
    result = resume(inputs, runs)
    assert_one_line(result, str(save), "delete")
    assert not marker.exists()
    assert (save / where).is_file()  # refused, not deleted: the user decides


def test_damaged_resume_state_is_refused_in_one_line(inputs, resumable):
    runs, save = resumable
    model = save / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    assert_one_line(resume(inputs, runs), "damaged training state", f"delete {save.parent} to")


def test_latest_naming_a_missing_save_is_refused_in_one_line(inputs, resumable):
    runs, save = resumable
    shutil.rmtree(save)
    assert_one_line(resume(inputs, runs), "'step_0000002'", f"delete {save.parent} to")


def test_a_damaged_metrics_json_is_refused_in_one_line(inputs, resumable):
    runs, _ = resumable
    (metrics,) = runs.glob("*/seed_*/round_00/metrics.json")
    metrics.write_text('{"round": 0, "spars')
    assert_one_line(resume(inputs, runs), f"{metrics}: damaged", "delete it to train")


def test_the_resumed_run_finishes(inputs, resumable):
    runs, _ = resumable
    result = resume(inputs, runs)
    assert result.returncode == 0, result.stderr
    assert not list(runs.rglob("checkpoint"))


HOLD = """
import sys, time
from pathlib import Path
from vl_prune.locks import locked
with locked(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2]).write_text("letting go")
"""


def hold(target: Path, seconds: float, tmp_path: Path) -> subprocess.Popen:
    """A process holding `target`'s lock for `seconds`; it writes "letting go" into
    `tmp_path/state` just before it does."""
    ready = tmp_path / "state"
    process = subprocess.Popen([*PYTHON, HOLD, str(target), str(ready), str(seconds)], env=ENV)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return process


def test_a_lock_waits_for_its_holder_and_names_it(tmp_path):
    target = tmp_path / "entry"
    holder = hold(target, 1.0, tmp_path)
    assert f"pid {holder.pid} on " in owner(target)
    said = []
    with locked(target, log=said.append):
        assert (tmp_path / "state").read_text() == "letting go"  # not before
        assert owner(target) is not None  # this process holds it now
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "HOLD" not in said[0]
    assert owner(target) is None and not lock_file(target).exists()


def test_a_killed_holders_lock_is_stale_and_taken(tmp_path):
    target = tmp_path / "entry"
    holder = hold(target, 60, tmp_path)
    holder.kill()
    holder.wait()
    assert lock_file(target).exists()  # left behind by the kill
    assert owner(target) is None
    said = []
    with locked(target, log=said.append):
        pass
    assert said == []  # nobody to wait for


BUILD = """
import sys, time
from pathlib import Path
from vl_prune.home import cached_folder

def build(folder):
    with open(sys.argv[1], "a") as log:
        log.write("built\\n")
    time.sleep(1.0)
    (folder / "data.txt").write_text("ok")

print(cached_folder("world/entry", build))
"""


def test_concurrent_processes_build_a_cache_entry_once(tmp_path):
    log = tmp_path / "builds.log"
    # a partial build a killed builder left: removed by the next build
    (tmp_path / "home" / "world" / ".entry.k1ll3d00").mkdir(parents=True)
    env = {**ENV, "VL_PRUNE_HOME": str(tmp_path / "home")}
    processes = [
        subprocess.Popen([*PYTHON, BUILD, str(log)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert log.read_text() == "built\n"
    entry = tmp_path / "home" / "world" / "entry"
    assert outputs == [str(entry)] * 2
    assert sorted(p.name for p in entry.parent.iterdir()) == ["entry"]


def test_two_identical_finds_started_together_train_once(inputs, tmp_path):
    single = CliRunner().invoke(cli, find_args(inputs, tmp_path / "alone", "--quiet", "--json"))
    alone = json.loads(single.stdout)
    # A third process holds the run folder until both finds wait for it: they meet for sure.
    run = tmp_path / "runs" / alone["run"]
    holder = hold(run, 600, tmp_path)
    command = [sys.executable, "-m", "vl_prune_cli.main", *find_args(inputs, run.parent, "--json")]
    env = {**ENV, "VL_PRUNE_HOME": str(tmp_path / "home")}
    logs = [tmp_path / f"find{i}.log" for i in range(2)]
    pair = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        for log in logs
    ]
    deadline = time.monotonic() + 120
    while not all(
        f"waiting: {run} is in use by pid {holder.pid}" in log.read_text() for log in logs
    ):
        assert all(p.poll() is None for p in pair) and time.monotonic() < deadline
        time.sleep(0.1)
    holder.kill()  # killed, not released: its lock goes with it
    holder.wait()
    reports = [json.loads(p.communicate(timeout=300)[0]) for p in pair]
    assert [p.returncode for p in pair] == [0, 0]
    texts = [log.read_text() for log in logs]
    trained = [text.count("training at sparsity") for text in texts]
    assert sorted(trained) == [0, 3]  # one trained the dense round and two pruned ones
    assert texts[trained.index(0)].count("finished earlier, skipped") == 3
    for report in reports:
        assert [r["score"] for r in report["rounds"]] == [r["score"] for r in alone["rounds"]]
    assert not lock_file(run).exists()


def test_a_job_of_several_processes_does_not_wait_for_a_lock(tmp_path, monkeypatch):
    """Its other ranks could only wait at a barrier, which times out with a traceback."""
    import accelerate.utils

    import vl_prune.distributed as distributed

    target = tmp_path / "run"
    holder = hold(target, 60, tmp_path)
    main = SimpleNamespace(num_processes=2, is_main_process=True)
    monkeypatch.setattr(distributed, "process_state", lambda: main)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
    try:
        with (
            pytest.raises(
                VLPruneError,
                match=rf"{target} is in use by pid {holder.pid} .*"
                "a job of several processes does not wait",
            ),
            distributed.job_lock(target),
        ):
            pytest.fail("entered a locked run folder")
    finally:
        holder.kill()
        holder.wait()
    with distributed.job_lock(target):  # free again: taken at once
        assert owner(target) is not None


def test_runs_clean_frees_leftovers_and_keeps_results(inputs, resumable, tmp_path, monkeypatch):
    runs, save = resumable
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    (run,) = runs.glob("uniter-nlvr2-*")
    (finished,) = run.glob("seed_*/round_00")
    shutil.copytree(save.parent, finished / "checkpoint")  # killed before its deletion
    (dense,) = runs.glob("dense/uniter-nlvr2-*/seed_*/round_00")  # the run's shared dense round
    shutil.copytree(save.parent, dense / "checkpoint")
    temporary = finished / ".metrics.json.ab12cd34.tmp"
    temporary.write_text("{")
    partial = tmp_path / "home" / "world" / ".nlvr2-v3-seed0.zz99yy88"
    partial.mkdir(parents=True)
    stale = tmp_path / "home" / "theta0" / ".uniter-tiny-0.safetensors.lock"
    stale.parent.mkdir()
    stale.write_text("{}")
    leftovers = [finished / "checkpoint", dense / "checkpoint", temporary, partial, stale]

    listed = CliRunner().invoke(cli, ["runs", "clean", "--runs", str(runs), "--dry-run"])
    assert listed.exit_code == 0, listed.output
    assert all(str(path) in listed.stdout for path in leftovers)
    assert str(save.parent) not in listed.stdout  # an unfinished round's resume point stays
    assert all(path.exists() for path in leftovers)
    assert "would free" in listed.stdout

    holder = hold(run, 60, tmp_path)
    try:
        busy = CliRunner().invoke(cli, ["runs", "clean", "--runs", str(runs)])
    finally:
        holder.kill()
        holder.wait()
    assert f"skipped: {run} is in use by pid {holder.pid}" in busy.stderr
    assert (finished / "checkpoint").exists()

    cleaned = CliRunner().invoke(cli, ["runs", "clean", "--runs", str(runs)])
    assert cleaned.exit_code == 0, cleaned.output
    assert not any(path.exists() for path in leftovers)
    assert (finished / "metrics.json").is_file() and (finished / "ticket.safetensors").is_file()
    assert (dense / "metrics.json").is_file() and (dense / "weights.safetensors").is_file()
    assert save.is_dir()
    assert "freed" in cleaned.stdout

    everything = CliRunner().invoke(cli, ["runs", "clean", "--runs", str(runs), "--resume-points"])
    assert everything.exit_code == 0
    assert not save.parent.exists()
