"""Shared dense rounds: runs that differ only in how they prune, and `transfer`'s dense scores,
train each seed's dense model once (`runs/dense/`), and go on exactly as if they had trained it.

Runs on a small NLVR2 world split and a freshly initialised tiny UNITER saved as a checkpoint.
"""

import json

import pytest
import torch

from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.lottery import Lottery
from vl_prune.ticket import Ticket
from vl_prune.train import TrainSettings
from vl_prune.transfer import Transfer


def settings(world, theta0, **overrides) -> FindSettings:
    defaults = dict(
        sparsity=0.3, train=TrainSettings(steps=3, batch_size=8, eval_batch_size=24), seeds=2
    )
    return FindSettings(
        backbone="uniter",
        task="nlvr2",
        checkpoint=str(theta0),
        data=str(world),
        **{**defaults, **overrides},
    )


def trainings(monkeypatch) -> list[str]:
    """The description of every fine-tuning started."""
    started = []
    train = Experiment.train

    def recorded(self, model, description, *args, **kwargs):
        started.append(description)
        return train(self, model, description, *args, **kwargs)

    monkeypatch.setattr(Experiment, "train", recorded)
    return started


def masks(lottery: Lottery, r: int, seed: int) -> dict[str, torch.Tensor]:
    return Ticket.load(lottery.round_folder(r, seed) / "ticket.safetensors").masks


def test_runs_that_differ_in_pruning_train_each_seeds_dense_model_once(
    world, theta0, tmp_path, monkeypatch
):
    started = trainings(monkeypatch)
    imp = Lottery(settings(world, theta0), runs=tmp_path)
    imp_report = imp.run()
    assert sum("round 0/" in d for d in started) == 2  # one dense model a seed
    started.clear()

    # One-shot cuts its first round at IMP's first target from the same dense weights: the
    # same masks, so the weights were read back, not only the score.
    oneshot = Lottery(settings(world, theta0, method="oneshot"), runs=tmp_path)
    oneshot_report = oneshot.run()
    random = Lottery(settings(world, theta0, method="random"), runs=tmp_path)
    random_report = random.run()
    assert not any("round 0/" in d for d in started)
    assert len(started) == 2 * (oneshot.rounds + random.rounds)  # every sparse round trained
    for report in (oneshot_report, random_report):
        assert report["rounds"][0]["scores"] == imp_report["rounds"][0]["scores"]
    for seed in imp.seeds:
        mine, theirs = masks(oneshot, 1, seed), masks(imp, 1, seed)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
        assert any(not torch.equal(masks(random, 1, seed)[n], mine[n]) for n in mine)

    # A run of its own from nothing gives the same rounds: sharing changed no result.
    alone = Lottery(settings(world, theta0, method="oneshot"), runs=tmp_path / "alone")
    alone_report = alone.run()
    assert [r["scores"] for r in alone_report["rounds"]] == [
        r["scores"] for r in oneshot_report["rounds"]
    ]


def test_transfer_scores_against_the_dense_model_find_trained(world, theta0, tmp_path, monkeypatch):
    report = Lottery(settings(world, theta0), runs=tmp_path).run()
    started = trainings(monkeypatch)
    dense = Transfer(settings(world, theta0), runs=tmp_path).dense_score()
    assert started == []
    assert dense["scores"] == report["rounds"][0]["scores"]
    # Other training settings are another dense model.
    longer = settings(world, theta0, train=TrainSettings(steps=4, batch_size=8, eval_batch_size=24))
    Transfer(longer, runs=tmp_path).dense_score()
    assert len(started) == 2


def test_a_finished_dense_round_is_read_without_its_lock(world, theta0, tmp_path, monkeypatch):
    """A job of several processes does not wait for a lock: it must not need one to read."""
    import vl_prune.dense

    Lottery(settings(world, theta0, seeds=1), runs=tmp_path).run()

    def refused(target):
        raise AssertionError(f"took the lock of {target}")

    monkeypatch.setattr(vl_prune.dense, "job_lock", refused)
    report = Lottery(settings(world, theta0, method="random", seeds=1), runs=tmp_path).run()
    assert report["rounds"][0]["seconds"] == 0.0  # read, not trained


def test_a_rewinding_run_trains_its_own_dense_round(world, theta0, tmp_path, monkeypatch):
    Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path).run()
    started = trainings(monkeypatch)
    rewinding = Lottery(settings(world, theta0, rewind_step=2, sparsity=0.2), runs=tmp_path)
    rewinding.run()
    assert sum("round 0/" in d for d in started) == 2  # it saves θ_k while training it
    for seed in rewinding.seeds:
        assert (rewinding.round_folder(0, seed) / "rewind.safetensors").is_file()


def test_a_damaged_dense_round_is_named_with_what_to_do(world, theta0, tmp_path):
    Lottery(settings(world, theta0, seeds=1), runs=tmp_path).run()
    (metrics,) = tmp_path.glob("dense/uniter-nlvr2-*/seed_0/round_00/metrics.json")
    metrics.write_text("{")
    random = Lottery(settings(world, theta0, method="random", seeds=1), runs=tmp_path)
    with pytest.raises(VLPruneError, match=f"{metrics}: damaged .* delete {metrics.parent} to"):
        random.run()
    weights = metrics.with_name("weights.safetensors")
    metrics.write_text(json.dumps({"score": 0.5, "seconds": 1.0}))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(VLPruneError, match=f"{weights}: damaged"):
        random.run()
