"""Seeds: independent streams, `--seeds N` runs in one folder with mean and std, rewinding from
step k, and runs keyed by the data's contents.

Runs on a small NLVR2 world split and a freshly initialised tiny UNITER saved as a checkpoint.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import vl_prune.experiment as experiment_module
from vl_prune.data.loader import EpochOrder
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.lottery import Lottery
from vl_prune.seeds import Stream, seed_of
from vl_prune.ticket import Ticket
from vl_prune.train import TrainSettings
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.world.theta0 import THETA0, THREADS, file_name, pretrained_tiny


def settings(world, theta0, **overrides) -> FindSettings:
    train = TrainSettings(steps=overrides.pop("steps", 4), batch_size=8, eval_batch_size=24, seed=0)
    return FindSettings(
        backbone="uniter",
        task="nlvr2",
        checkpoint=str(theta0),
        data=str(world),
        sparsity=overrides.pop("sparsity", 0.2),
        train=train,
        **overrides,
    )


def order(seed: int, epoch: int) -> list[int]:
    sampler = EpochOrder(50, seed)
    sampler.start(epoch)
    return [position for _, position in sampler]


def test_seeds_do_not_share_epochs():
    # With `seed + epoch`, epoch 1 of seed 0 was epoch 0 of seed 1.
    assert order(0, 1) != order(1, 0)
    assert order(0, 1) == order(0, 1)
    assert len({tuple(order(seed, epoch)) for seed in range(3) for epoch in range(3)}) == 9
    assert seed_of(0, Stream.ORDER, 1) != seed_of(1, Stream.ORDER, 0)
    assert seed_of(0, Stream.HEAD) != seed_of(0, Stream.DROPOUT)


def test_seeds_share_theta0_and_differ_in_the_head(world, theta0):
    experiment = Experiment(settings(world, theta0))
    first, again, other = experiment.fresh(0), experiment.fresh(0), experiment.fresh(1)
    for name, value in first.backbone.state_dict().items():
        assert torch.equal(value, other.backbone.state_dict()[name]), name
    heads = [model.head.state_dict() for model in (first, again, other)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert any(not torch.equal(heads[0][k], heads[2][k]) for k in heads[0])


def test_seeds_run_in_one_folder_and_report_mean_and_std(world, theta0, tmp_path):
    one = Lottery(settings(world, theta0), runs=tmp_path)
    single = one.run()
    dense_seed0 = (one.round_folder(0) / "metrics.json").stat().st_mtime_ns
    two = Lottery(settings(world, theta0, seeds=2), runs=tmp_path)
    assert two.folder == one.folder  # the seed is no part of the run's name
    report = two.run()
    # Seed 0 was finished by the first run: kept, not trained again.
    assert (two.round_folder(0, 0) / "metrics.json").stat().st_mtime_ns == dense_seed0
    assert report["seeds"] == [0, 1]
    assert [r["scores"][0] for r in report["rounds"]] == [r["score"] for r in single["rounds"]]
    for row in report["rounds"]:
        per_seed = [
            json.loads((two.round_folder(row["round"], s) / "metrics.json").read_text())["score"]
            for s in (0, 1)
        ]
        assert row["scores"] == per_seed
        assert row["score"] == pytest.approx(sum(per_seed) / 2)
        assert row["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)
        assert row["fraction_of_dense"] == pytest.approx(row["score"] / report["dense_score"])
    # Each seed prunes its own trained weights: the masks are the seeds' own.
    masks = [Ticket.load(two.round_folder(1, s) / "ticket.safetensors") for s in (0, 1)]
    assert masks[0].metadata["seed"] == 0 and masks[1].metadata["seed"] == 1
    assert any(not torch.equal(masks[0].masks[n], masks[1].masks[n]) for n in masks[0].masks)
    # The ticket kept is chosen on the mean and carries every seed's score.
    final = report["final"]
    holding = [r for r in report["rounds"] if r["score"] >= report["keep"] * report["dense_score"]]
    assert final["round"] == max(holding, key=lambda r: r["sparsity"])["round"]
    kept = Ticket.load(two.folder / "ticket.safetensors")
    assert kept.metadata["scores"] == final["scores"] and kept.metadata["seeds"] == [0, 1]


def test_find_cli_prints_mean_and_std_over_seeds(world, theta0, tmp_path):
    args = ["find", "--model", "uniter", "--task", "nlvr2", "--checkpoint", str(theta0)]
    args += ["--data", str(world), "--batch-size", "8", "--steps", "2", "--sparsity", "0.1"]
    args += ["--seed", "3", "--seeds", "2", "--runs", str(tmp_path), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "(mean ± std, 2 seeds)" in result.output
    (run,) = tmp_path.glob("uniter-nlvr2-*")
    assert sorted(p.name for p in run.glob("seed_*")) == ["seed_3", "seed_4"]
    refused = CliRunner().invoke(cli, [*args, "--seeds", "0"])
    assert refused.exit_code == 2 and "'--seeds': 0 is not in the range x>=1" in refused.output


def test_evaluate_trains_a_ticket_once_per_seed(world, theta0, tmp_path):
    lottery = Lottery(settings(world, theta0, sparsity=0.1, steps=2), runs=tmp_path)
    lottery.run()
    ticket = lottery.round_folder(1) / "ticket.safetensors"
    args = ["evaluate", "--ticket", str(ticket), "--task", "nlvr2", "--checkpoint", str(theta0)]
    args += ["--data", str(world), "--batch-size", "8", "--steps", "2", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--seeds", "2", "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["seeds"] == [77, 78]  # NLVR2's recipe seed, then the next
    assert len(evaluated["scores"]) == 2
    assert evaluated["score"] == pytest.approx(sum(evaluated["scores"]) / 2)
    alone = CliRunner().invoke(cli, [*args, "--seed", "78", "--json"])
    assert json.loads(alone.output)["score"] == evaluated["scores"][1]


def test_rewound_rounds_train_from_step_k_to_the_end(world, theta0, tmp_path, monkeypatch):
    starts, fit = [], experiment_module.fit

    def recording(*args, **kwargs):
        starts.append(kwargs["start"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(experiment_module, "fit", recording)
    found = settings(world, theta0, method="rewind", rewind_step=3, steps=5, sparsity=0.2)
    Lottery(found, runs=tmp_path).run()
    assert starts == [0, 3, 3]


def test_fit_from_step_k_takes_the_schedule_from_there(world, theta0):
    from vl_prune.train import _schedule

    experiment = Experiment(settings(world, theta0, steps=10))
    rates = []
    model = experiment.fresh()
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        experiment.train(model, "rewound", quiet=True, start=6)
    lr = experiment.settings.train.lr
    assert rates == pytest.approx(
        [lr * _schedule(experiment.settings.train)(s) for s in range(6, 10)]
    )


def test_runs_follow_the_data_contents_not_its_path(world, theta0, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(world, copy)
    here = Lottery(settings(world, theta0), runs=tmp_path / "runs")
    there = Lottery(settings(copy, theta0), runs=tmp_path / "runs")
    assert here.folder == there.folder
    annotations = next(copy.rglob("*.json*"))
    annotations.write_bytes(annotations.read_bytes().replace(b"True", b"False", 1))
    edited = Lottery(settings(copy, theta0), runs=tmp_path / "runs")
    assert edited.folder != here.folder


def test_theta0_is_pretrained_with_fixed_threads_whatever_the_callers(tmp_path, monkeypatch):
    import vl_prune.distributed as distributed
    import vl_prune_plugins.world.splits.pretrain as pretrain_split

    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path))
    monkeypatch.setattr(pretrain_split, "WORLD_SIZES", {"train": 16, "dev": 8})
    asked = []

    def alone(function, *args):
        asked.append(args[-1])  # the threads
        raise RuntimeError("stop before pre-training")

    monkeypatch.setattr(distributed, "run_alone", alone)
    names, before = set(), torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            with pytest.raises(RuntimeError, match="stop before"):
                pretrained_tiny(Uniter, "uniter", THETA0)
            names.add(file_name("uniter", Uniter.build("tiny"), THETA0))
    finally:
        torch.set_num_threads(before)
    assert asked == [THREADS, THREADS] and len(names) == 1


def test_dropout_setting_holds_for_the_whole_fine_tuning(world, theta0):
    # `--dropout 0` (the world recipes' way to a converged dense model) leaves no randomness in a
    # training-mode forward; unset, the model keeps its own dropout.
    def forward_twice(dropout):
        found = settings(world, theta0, steps=2)
        found = replace(found, train=replace(found.train, dropout=dropout))
        experiment = Experiment(found)
        _, trained = experiment.train(experiment.fresh(), "dropout", quiet=True)
        batch = experiment.task.collate(list(experiment.eval_examples[:4]), trained.backbone)
        trained.train()
        return [trained(batch) for _ in range(2)]

    same = forward_twice(0.0)
    assert torch.equal(same[0], same[1])
    differ = forward_twice(None)
    assert not torch.equal(differ[0], differ[1])
    assert "dropout" not in TrainSettings().identity()
    assert TrainSettings(dropout=0.0).identity() != TrainSettings().identity()
    with pytest.raises(VLPruneError, match=r"--dropout must be in \[0, 1\), not 1.5"):
        TrainSettings(dropout=1.5)
