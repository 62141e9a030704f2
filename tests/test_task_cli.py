"""`vlprune find` and `vlprune transfer` through the real CLI on GQA, SNLI-VE, RefCOCO+,
retrieval and VCR with each backbone (UNITER, LXMERT, ViLT; ViLT × RefCOCO+ is refused, see
test_refcoco.py).

Each task's world is a handful of images in a temporary `$VL_PRUNE_HOME`, and each backbone's θ0
is a freshly initialised tiny checkpoint passed with `--checkpoint`: what is tested is that every
pair runs end to end and writes what a user reads, not what it scores, and fourteen finds plus
three transfer tables have to fit in a CPU test run.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import vl_prune_plugins.world.splits.gqa as gqa
import vl_prune_plugins.world.splits.refcoco as refcoco
import vl_prune_plugins.world.splits.retrieval as retrieval
import vl_prune_plugins.world.splits.snli_ve as snli_ve
import vl_prune_plugins.world.splits.vcr as vcr
from vl_prune.ticket import Ticket
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt

# Every test here trains tiny models (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = {"uniter": Uniter, "lxmert": Lxmert, "vilt": Vilt}
# The metric each task reports under: report.json, the printed table and transfer cells name it.
METRICS = {
    "gqa": "accuracy",
    "snli-ve": "accuracy",
    "refcoco+": "accuracy",
    "retrieval": "recall_mean",
    "vcr": "q_ar_accuracy",
}
# Images per split. More than one for retrieval: its negatives are the split's other images and
# their captions.
WORLDS = {
    gqa: {"train": 4, "testdev": 2},
    snli_ve: {"train": 4, "dev": 2},
    refcoco: {"train": 4, "val": 2},
    retrieval: {"train": 4, "val": 3},
    vcr: {"train": 6, "val": 4},
}
PAIRS = [
    (backbone, task)
    for backbone in BACKBONES
    for task in METRICS
    if (backbone, task) != ("vilt", "refcoco+")  # regions only: refused, tested in test_refcoco
]
# Each backbone's transfer table starts from a ticket found on a different task.
SOURCES = {"uniter": "gqa", "lxmert": "vcr", "vilt": "retrieval"}
TRAINING = ["--steps", "2", "--batch-size", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One small-world `$VL_PRUNE_HOME` for the module: each task's world is written once and
    shared by the three backbones."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VL_PRUNE_HOME", str(folder))
        for module, sizes in WORLDS.items():
            patch.setattr(module, "WORLD_SIZES", sizes)
        yield folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A fresh tiny θ0 file per backbone, so no test waits for the embedded pre-trained one."""
    folder = tmp_path_factory.mktemp("theta0")
    paths = {}
    for name, backbone in BACKBONES.items():
        torch.manual_seed(0)
        paths[name] = folder / f"{name}.safetensors"
        save_file(backbone.build("tiny").state_dict(), paths[name])
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def find(home, checkpoints, runs):
    """`vlprune find` to 10% sparsity (the dense round and one pruned round) for a backbone
    and task, run once per module: the transfer tests start from the same runs."""
    results = {}

    def run(backbone, task):
        if (backbone, task) not in results:
            args = ["find", "--model", backbone, "--task", task, *TRAINING, "--sparsity", "0.1"]
            args += ["--checkpoint", str(checkpoints[backbone]), "--runs", str(runs)]
            results[backbone, task] = CliRunner().invoke(cli, [*args, "--quiet", "--json"])
        return results[backbone, task]

    return run


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.parametrize(("backbone", "task"), PAIRS)
def test_find_writes_a_run_folder_with_a_ticket_and_report(find, runs, backbone, task):
    result = find(backbone, task)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    folder = runs / printed["run"]
    report = json.loads((folder / "report.json").read_text())
    assert report == {k: v for k, v in printed.items() if k != "seconds"}
    assert (report["backbone"], report["task"]) == (backbone, task)
    assert report["metric"] == METRICS[task]
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert all(finite(r["score"]) for r in report["rounds"])
    seed = folder / f"seed_{report['final']['seed']}"
    ticket = Ticket.load(seed / "round_01" / "ticket.safetensors")
    assert ticket.sparsity == pytest.approx(0.1, abs=0.005)
    assert report["rounds"][1]["sparsity"] == pytest.approx(ticket.sparsity)
    assert (ticket.metadata["backbone"], ticket.metadata["task"]) == (backbone, task)
    assert ticket.metadata["metric"] == METRICS[task]
    # The run's final ticket is one of its rounds', at the top of the folder with the scores.
    final = Ticket.load(seed / f"round_{report['final']['round']:02d}" / "ticket.safetensors")
    kept = Ticket.load(folder / "ticket.safetensors")
    assert all(torch.equal(kept.masks[n], final.masks[n]) for n in final.masks)
    assert kept.metadata["round"] == final.metadata["round"] == report["final"]["round"]
    assert kept.metadata["scores"] == report["final"]["scores"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_transfer_fills_a_cell_for_every_task(find, checkpoints, runs, tmp_path, backbone):
    source = SOURCES[backbone]
    found = find(backbone, source)
    assert found.exit_code == 0, found.output
    targets = [task for b, task in PAIRS if b == backbone]
    args = ["transfer", "--ticket", str(runs / json.loads(found.stdout)["run"])]
    for task in targets:
        args += ["--task", task]
    args += ["--checkpoint", str(checkpoints[backbone]), *TRAINING, "--runs", str(runs)]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "transfer.json").read_text())
    assert table["columns"] == targets
    (row,) = table["rows"]  # the run's one pruned round
    assert row["label"] == f"{source} imp 10%"
    assert list(row["cells"]) == targets
    for task, cell in row["cells"].items():
        assert (cell["task"], cell["metric"]) == (task, METRICS[task])
        found_on = {"task": source, "method": "imp", "round": 1, "backbone": backbone}
        assert cell["source"] == {**found_on, "seed": json.loads(found.stdout)["seeds"][0]}
        assert cell["sparsity"] == pytest.approx(0.1, abs=0.005)
        assert finite(cell["score"]) and finite(cell["dense_score"])
        assert cell["dense_score"] == table["dense"][task]
        assert not cell["other_weights"]
    assert (tmp_path / "transfer.md").read_text().splitlines()[0] == (
        "| ticket | " + " | ".join(targets) + " |"
    )
