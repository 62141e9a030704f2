"""`vlprune transfer`: tickets trained from θ0 on other tasks, scored against each task's dense
model (trained once and cached), and the transfer table.

Small NLVR2 and VQA world splits in a temporary `$VL_PRUNE_HOME`, and a freshly initialised
tiny UNITER checkpoint as θ0, so no test waits for the embedded θ0.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import vl_prune_plugins.world.splits.nlvr2 as nlvr2
import vl_prune_plugins.world.splits.pretrain as pretrain
import vl_prune_plugins.world.splits.vqa as vqa
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.lottery import Lottery
from vl_prune.ticket import Ticket
from vl_prune.train import TrainSettings
from vl_prune.transfer import Transfer, markdown, table
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh `$VL_PRUNE_HOME` whose world splits are small."""
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(nlvr2, "WORLD_SIZES", {"train": 48, "dev": 24})
    monkeypatch.setattr(vqa, "WORLD_SIZES", {"train": 48, "dev": 24})
    monkeypatch.setattr(pretrain, "WORLD_SIZES", {"train": 48, "dev": 24})
    return tmp_path / "home"


def theta0(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(Uniter.build("tiny").state_dict(), path)
    return path


def settings(checkpoint: Path, task: str, seed: int = 0, **extra) -> FindSettings:
    train = TrainSettings(steps=3, batch_size=8, eval_batch_size=24, seed=seed)
    return FindSettings(
        backbone="uniter", task=task, checkpoint=str(checkpoint), train=train, **extra
    )


@pytest.fixture
def run(home, tmp_path) -> Path:
    """A finished nlvr2 IMP run folder: rounds at 0, 10 and 20% sparsity."""
    weights = theta0(tmp_path / "theta0.safetensors", seed=0)
    lottery = Lottery(settings(weights, "nlvr2", sparsity=0.2), runs=tmp_path / "runs")
    lottery.run()
    return lottery.folder


def trainings(monkeypatch) -> list[Experiment]:
    """Records every fine-tuning the code under test starts."""
    started = []
    train = Experiment.train

    def recorded(self, model, *args, **kwargs):
        started.append(model)
        return train(self, model, *args, **kwargs)

    monkeypatch.setattr(Experiment, "train", recorded)
    return started


def cli_args(run: Path, *tasks: str) -> list[str]:
    args = [
        "transfer",
        "--ticket",
        str(run),
        "--checkpoint",
        str(run.parent.parent / "theta0.safetensors"),
    ]
    for task in tasks:
        args += ["--task", task]
    return [*args, "--steps", "3", "--batch-size", "8", "--runs", str(run.parent), "--quiet"]


def test_a_ticket_is_scored_against_the_dense_score_trained_once(run, monkeypatch):
    started = trainings(monkeypatch)
    (seed,) = run.glob("seed_*")
    path = seed / "round_02" / "ticket.safetensors"
    ticket = Ticket.load(path)
    weights = run.parent.parent / "theta0.safetensors"
    target = Transfer(settings(weights, "vqa"), runs=run.parent)
    result = target.run(path)
    assert len(started) == 2  # the ticket, then the dense model
    assert (result["task"], result["metric"]) == ("vqa", "vqa_score")
    assert result["source"]["task"] == "nlvr2"
    assert result["sparsity"] == pytest.approx(ticket.sparsity)
    assert result["fraction_of_dense"] == pytest.approx(result["score"] / result["dense_score"])
    # The trained model is the ticket's mask on θ0's backbone: same masks, dead weights zero.
    trained = started[0].backbone
    for name, mask in Ticket.from_model(trained, trained.prunable()).masks.items():
        assert torch.equal(mask, ticket.masks[name])
    for module, name in trained.prunable():
        assert not getattr(module, name)[~getattr(module, name + "_mask")].any()

    again = Transfer(settings(weights, "vqa"), runs=run.parent)
    assert again.run(path) == result
    assert len(started) == 2  # both results came from the cache
    assert len(list((run.parent / "transfer").glob("uniter-vqa-*.json"))) == 1
    # The dense model is kept as find keeps it, for find's runs on the task to share.
    (dense,) = (run.parent / "dense").glob("uniter-vqa-*")
    assert [p.name for p in dense.glob("seed_*/round_00/metrics.json")] == ["metrics.json"]
    Transfer(settings(weights, "vqa", seed=1), runs=run.parent).dense_score()
    assert len(started) == 3  # another seed trains another dense model
    longer = replace(settings(weights, "vqa"), train=TrainSettings(steps=4, batch_size=8))
    Transfer(longer, runs=run.parent).dense_score()
    assert len(started) == 4  # and so do other training settings


def test_a_run_folder_builds_the_table_and_a_rerun_trains_nothing(run, tmp_path, monkeypatch):
    out = tmp_path / "table"
    result = CliRunner().invoke(cli, [*cli_args(run, "nlvr2", "vqa"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "transfer.json").read_text())
    assert table["columns"] == ["nlvr2", "vqa"]
    assert [row["label"] for row in table["rows"]] == ["nlvr2 imp 10%", "nlvr2 imp 20%"]
    for row in table["rows"]:
        for task, cell in row["cells"].items():
            assert cell["dense_score"] == table["dense"][task]
    markdown = (out / "transfer.md").read_text()
    assert markdown.splitlines()[0] == "| ticket | nlvr2 | vqa |"
    assert markdown in result.output
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    started = trainings(monkeypatch)
    rerun = CliRunner().invoke(cli, [*cli_args(run, "nlvr2", "vqa"), "--json"])
    assert rerun.exit_code == 0, rerun.output
    assert started == []
    assert json.loads(rerun.stdout) == table


def test_a_pretraining_ticket_transfers_to_every_task(home, tmp_path):
    weights = theta0(tmp_path / "theta0.safetensors", seed=0)
    lottery = Lottery(settings(weights, "pretrain", sparsity=0.1), runs=tmp_path / "runs")
    lottery.run()
    args = ["transfer", "--ticket", str(lottery.folder), "--checkpoint", str(weights)]
    args += ["--task", "nlvr2", "--task", "vqa", "--steps", "2", "--batch-size", "8"]
    args += ["--runs", str(tmp_path / "runs")]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    assert row["label"] == "pretrain imp 10%"
    assert sorted(row["cells"]) == ["nlvr2", "vqa"]
    assert not any(cell["other_weights"] for cell in row["cells"].values())


def test_a_ticket_from_other_weights_is_refused_unless_forced(run, tmp_path):
    other = theta0(tmp_path / "other.safetensors", seed=1)
    (seed,) = run.glob("seed_*")
    ticket = seed / "round_01" / "ticket.safetensors"
    args = ["transfer", "--ticket", str(ticket), "--task", "vqa", "--checkpoint", str(other)]
    args += ["--steps", "2", "--batch-size", "8", "--runs", str(run.parent), "--quiet"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2
    assert "--force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    forced = CliRunner().invoke(cli, [*args, "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["other_weights"] is True


def test_bad_sources_and_flags_are_one_line_errors(run, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cases = [
        (["--ticket", str(tmp_path / "nowhere.safetensors")], "nowhere.safetensors"),
        (["--ticket", str(empty)], "no finished pruned rounds"),
        (["--ticket", str(run), "--data", str(tmp_path), "--task", "nlvr2"], "single --task"),
        (["--ticket", str(run), "--out", str(run / "config.json")], "not a folder"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(cli, ["transfer", "--task", "vqa", *extra])
        assert result.exit_code == 2, extra
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1


def cell(ticket: str, seed: int, scores: list[float], dense: float) -> dict:
    mean = sum(scores) / len(scores)
    return {
        "ticket": ticket,
        "task": "vqa",
        "source": {"task": "nlvr2", "method": "imp", "round": 1, "seed": seed},
        "sparsity": 0.1,
        "score": mean,
        "std": 0.01,
        "scores": scores,
        "dense_score": dense,
        "fraction_of_dense": mean / dense,
        "other_weights": False,
    }


def test_a_table_tells_the_seeds_of_a_run_apart_and_shows_their_spread():
    results = [
        cell("runs/r/seed_0/round_01/ticket.safetensors", 0, [0.5, 0.52], 0.5),
        cell("runs/r/seed_1/round_01/ticket.safetensors", 1, [0.48, 0.5], 0.5),
    ]
    transfer = table(results)
    labels = [row["label"] for row in transfer["rows"]]
    assert labels == [
        "nlvr2 imp 10% (seed 0, seed_0/round_01/ticket.safetensors)",
        "nlvr2 imp 10% (seed 1, seed_1/round_01/ticket.safetensors)",
    ]
    assert "| 102.0% ± 2.0% |" in markdown(transfer)
