"""Batches collated by a DataLoader: the shuffled order, per-batch seeded collation, and results
that do not depend on the number of worker processes.

The collation below draws from torch's generator, as pre-training's masks and retrieval's
negatives do: whatever a batch draws must be the same in the main process and in any worker.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import vl_prune_plugins.world.splits.pretrain as pretrain
from vl_prune.data.loader import EpochOrder, batches
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune.train import TrainSettings, fit, make_accelerator
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.tasks.pretrain import Pretrain


def draw(examples: list[int]) -> tuple[tuple[int, ...], float]:
    """A collation that draws from torch's generator: the batch's examples and one draw."""
    return tuple(examples), torch.rand(()).item()


def draws(
    shuffle: bool,
    epochs: tuple[int, ...] = (0,),
    workers: int = 0,
    seed: int = 0,
    size: int = 6,
    batch_size: int = 1,
) -> list[dict[tuple[int, ...], float]]:
    """For each epoch (one loader serving them all, as `fit` uses it): each batch → its draw."""
    loader, order = batches(list(range(size)), draw, batch_size, seed, shuffle, workers)
    out = []
    for epoch in epochs:
        order.start(epoch)
        out.append(dict(loader))
    return out


# (a) the order ------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "epoch"), [(0, 1), (3, 2), (11, 1)])
def test_epoch_order_is_fixed_by_seed_and_epoch_and_shared_with_no_other(seed, epoch):
    # A resumed run, a worker or another process must see the same order for (seed, epoch);
    # `seed + epoch` gave epoch e of seed s the order of epoch e-1 of seed s+1.
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochOrder(40, seed)
        sampler.start(epoch)
        assert all(e == epoch for e, _ in sampler)
        return [position for _, position in sampler]

    assert order(seed, epoch) == order(seed, epoch)
    assert order(seed, epoch) != order(seed + 1, epoch - 1)
    assert order(seed, epoch) != order(seed, epoch - 1)


def test_epoch_order_is_a_permutation_per_epoch_and_in_order_without_seed():
    order = EpochOrder(10, 4)
    epochs = []
    for epoch in (0, 1, 0):
        order.start(epoch)
        epochs.append([p for _, p in order])
    assert all(sorted(positions) == list(range(10)) for positions in epochs)
    assert epochs[0] != epochs[1] and epochs[2] == epochs[0]
    assert len(order) == 10
    unshuffled = EpochOrder(7, None)
    unshuffled.start(3)
    assert list(unshuffled) == [(3, i) for i in range(7)]


# (b) the number of workers changes nothing --------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain, "WORLD_SIZES", {"train": 6, "dev": 2})
        pretrain.write(root)
    return root


def _train(world, workers: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    task = Pretrain(world)
    examples = task.examples("train")[:20]
    # 3 batches an epoch: 7 steps cross two epoch boundaries with the same (persistent) workers.
    settings = TrainSettings(steps=7, batch_size=8, lr=1e-3, seed=3, num_workers=workers)
    torch.manual_seed(0)
    backbone = Uniter("tiny", num_hidden_layers=1)
    accelerator = make_accelerator(settings)
    model = accelerator.prepare(VLModel(backbone, task.head(backbone)))
    losses = fit(model, task, examples, settings, accelerator, quiet=True)
    state = accelerator.unwrap_model(model).state_dict()
    return losses, {k: v.detach().clone() for k, v in state.items()}


def test_pretraining_is_bit_identical_with_and_without_workers(pretrain_world, one_thread):
    losses, weights = _train(pretrain_world, workers=0)
    assert len(losses) == 7
    in_workers, weights_in_workers = _train(pretrain_world, workers=2)
    assert in_workers == losses
    assert weights_in_workers.keys() == weights.keys()
    changed = [k for k in weights if not torch.equal(weights[k], weights_in_workers[k])]
    assert not changed, f"weights differ with 2 workers: {changed[:5]}"


# (c) torch's global generator is left alone -------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("shuffle", [True, False])
def test_iterating_batches_draws_nothing_from_the_global_generator(shuffle, workers):
    expected = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    loader, order = batches(list(range(8)), draw, 3, 5, shuffle, workers)
    for epoch in (0, 1):
        order.start(epoch)
        assert len(list(loader)) == 3
    assert torch.equal(torch.rand(4), torch.rand(4, generator=expected))


def test_batches_through_accelerate_draw_nothing_from_the_global_generator():
    # fit iterates the loader as Accelerate prepares it; dropout draws from the global generator.
    accelerator = make_accelerator(TrainSettings())
    expected = torch.Generator().manual_seed(99)
    torch.manual_seed(99)
    loader, order = batches(list(range(8)), draw, 3, 5, True, 0)
    prepared = accelerator.prepare(loader)
    for epoch in (0, 1):
        order.start(epoch)
        assert sum(len(b[0]) for b in prepared) == 8
    assert torch.equal(torch.rand(4), torch.rand(4, generator=expected))


# (d) what a batch draws: by seed, purpose, epoch and examples ---------------------------------


def test_collation_draws_repeat_for_the_same_seed_epoch_and_batch():
    first = draws(shuffle=True, epochs=(0, 1, 0))
    assert first[2] == first[0], "the same epoch again: the same draws"
    assert draws(shuffle=True, epochs=(0, 1)) == first[:2], "a fresh loader: the same draws"
    assert draws(shuffle=False)[0] == draws(shuffle=False)[0]


def test_collation_draws_differ_between_batches_epochs_purposes_and_seeds():
    epoch_0, epoch_1 = draws(shuffle=True, epochs=(0, 1))
    assert epoch_0.keys() == epoch_1.keys() == {(i,) for i in range(6)}
    assert len(set(epoch_0.values())) == 6, "every batch of an epoch draws differently"
    assert all(epoch_0[k] != epoch_1[k] for k in epoch_0), "the same example, another epoch"
    (evaluation,) = draws(shuffle=False)
    assert all(epoch_0[k] != evaluation[k] for k in epoch_0), "training and evaluation differ"
    (other_seed,) = draws(shuffle=True, seed=1)
    assert all(epoch_0[k] != other_seed[k] for k in epoch_0)
    # Evaluation has one order; its epoch still seeds its draws.
    unshuffled_0, unshuffled_1 = draws(shuffle=False, epochs=(0, 1))
    assert unshuffled_0.keys() == unshuffled_1.keys()
    assert all(unshuffled_0[k] != unshuffled_1[k] for k in unshuffled_0)
    # A batch is seeded by all its examples, not just the first.
    (pairs,) = draws(shuffle=False, batch_size=2, size=4)
    (other_pairs,) = draws(shuffle=False, batch_size=2, size=3)
    assert pairs[(0, 1)] == other_pairs[(0, 1)]
    (singles,) = draws(shuffle=False, size=2)
    assert pairs[(0, 1)] != singles[(0,)]


def test_collation_draws_are_the_same_in_worker_processes():
    in_process = draws(shuffle=True, epochs=(0, 1), size=8, batch_size=3)
    assert draws(shuffle=True, epochs=(0, 1), size=8, batch_size=3, workers=2) == in_process


# (e) settings -------------------------------------------------------------------------------


def test_num_workers_is_no_part_of_a_runs_identity():
    assert TrainSettings(num_workers=3).identity() == TrainSettings().identity()
    assert "num_workers" not in TrainSettings(num_workers=0).identity()
    assert TrainSettings(num_workers=3).workers == 3
    assert TrainSettings(num_workers=0).workers == 0
    assert TrainSettings(seed=1).identity() != TrainSettings().identity()


@pytest.mark.parametrize(("field", "flag"), [("num_workers", "--num-workers"), ("seed", "--seed")])
def test_negative_workers_or_seed_are_refused(field, flag, tmp_path):
    with pytest.raises(VLPruneError, match=rf"{flag} must be .+, not -1"):
        TrainSettings(**{field: -1})
    result = CliRunner().invoke(
        cli,
        [
            *("find", "--task", "nlvr2", "--checkpoint", str(tmp_path / "none.pt")),
            *("--data", str(tmp_path), "--runs", str(tmp_path / "runs"), flag, "-1"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"'{flag}': -1 is not in the range" in result.stderr  # refused while parsing
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_seeds_past_32_bits_are_refused():
    # The seed is a word of its streams' keys (`vl_prune.seeds`): a wider one would alias others.
    with pytest.raises(VLPruneError, match=r"--seed must be between 0 and 2\*\*32 - 1"):
        TrainSettings(seed=2**32)
