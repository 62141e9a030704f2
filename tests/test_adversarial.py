"""Adversarial fine-tuning (VILLA) and adversarial IMP: the perturbations, the masks, the flags.

A small NLVR2 world split and a freshly initialised tiny UNITER saved as a checkpoint.
"""

import itertools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import vl_prune_plugins.world.splits.nlvr2 as nlvr2_world
from vl_prune.adversarial import AdversarialSettings, adversarial_backward
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.lottery import Lottery
from vl_prune.pruning import GlobalRandom
from vl_prune.ticket import Ticket
from vl_prune.train import TrainSettings, fit, make_accelerator
from vl_prune_cli.main import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nlvr2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2_world, "WORLD_SIZES", {"train": 32, "dev": 16})
        nlvr2_world.write(root)
    return root


def settings(world, theta0, adversarial=None, **overrides) -> FindSettings:
    train = TrainSettings(steps=3, batch_size=8, eval_batch_size=16, adversarial=adversarial)
    return FindSettings(
        backbone="uniter",
        task="nlvr2",
        checkpoint=str(theta0),
        data=str(world),
        train=train,
        **overrides,
    )


def one_step(world, theta0, adversarial: AdversarialSettings):
    """One adversarial step on the first training batch, without dropout so that every pass
    differs only by its perturbation."""
    experiment = Experiment(settings(world, theta0))
    model = experiment.fresh().eval()
    task = experiment.task
    batch = task.collate(experiment.train_examples[:8], model.backbone)
    accelerator = make_accelerator(TrainSettings())
    step = adversarial_backward(model, task, batch, adversarial, accelerator)
    return step, model, batch


def norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(delta.shape[0], -1).norm(dim=1)


def test_the_loss_on_perturbed_input_rises_over_the_ascent_steps(world, theta0):
    step, model, batch = one_step(world, theta0, AdversarialSettings(steps=4, lr=0.01))
    losses = [step.loss.item(), *step.perturbed_losses]
    assert len(losses) == 5
    assert all(later > earlier for earlier, later in itertools.pairwise(losses))
    # Both images of an NLVR2 pair, both modalities, each example moved 4 × lr at most.
    assert len(step.deltas) == 2
    for text, image in step.deltas:
        assert text.shape == model.backbone.perturbation_shapes(batch.inputs[0])[0]
        assert image is not None and bool((norms(image) <= 4 * 0.01 + 1e-6).all())
        assert bool((norms(text) > 0).all())
    # Every parameter the clean loss reaches has a gradient, the head's included.
    assert model.head.classifier[-1].weight.grad.abs().sum() > 0


def test_perturbations_stay_within_max_norm(world, theta0):
    bound = 0.3
    step, _, _ = one_step(world, theta0, AdversarialSettings(steps=3, lr=0.25, max_norm=bound))
    for pair in step.deltas:
        for delta in pair:
            assert bool((norms(delta) <= bound * (1 + 1e-5)).all())
            # The ascent went past the bound (3 × 0.25 > 0.3), so the projection did act.
            assert norms(delta).max() == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize(
    ("modality", "text", "image"), [("text", True, False), ("image", False, True)]
)
def test_one_modality_leaves_the_other_clean(world, theta0, modality, text, image):
    step, _, _ = one_step(world, theta0, AdversarialSettings(steps=1, modality=modality))
    for pair in step.deltas:
        assert (pair[0] is not None, pair[1] is not None) == (text, image)


def test_masks_stay_intact_through_adversarial_fine_tuning(world, theta0):
    found = settings(world, theta0, adversarial=AdversarialSettings(lr=0.1))
    experiment = Experiment(found)
    model = experiment.fresh()
    GlobalRandom.prune_group(model.backbone.prunable(), 0.5, seed=0)
    before = Ticket.from_model(model.backbone, model.backbone.prunable())
    origs = {
        id(module): getattr(module, name + "_orig").detach().clone()
        for module, name in model.backbone.prunable()
    }
    accelerator = make_accelerator(found.train)
    prepared = accelerator.prepare(model)
    losses = fit(prepared, experiment.task, experiment.train_examples, found.train, accelerator)
    assert len(losses) == 3
    after = Ticket.from_model(model.backbone, model.backbone.prunable())
    assert all(torch.equal(after.masks[n], before.masks[n]) for n in before.masks)
    for module, name in model.backbone.prunable():
        mask = getattr(module, name + "_mask")
        assert not getattr(module, name)[~mask].any()  # the weight the forward uses
        assert not torch.equal(getattr(module, name + "_orig")[mask], origs[id(module)][mask])


def test_adversarial_and_plain_fine_tuning_give_different_results(world, theta0):
    plain = Experiment(settings(world, theta0))
    adversarial = Experiment(settings(world, theta0, adversarial=AdversarialSettings(lr=0.5)))
    _, plain_model = plain.train(plain.fresh(), "plain", quiet=True)
    _, adversarial_model = adversarial.train(adversarial.fresh(), "adversarial", quiet=True)
    weight = "head.classifier.3.weight"
    assert not torch.equal(plain_model.state_dict()[weight], adversarial_model.state_dict()[weight])


def test_adv_imp_runs_adversarially_in_its_own_run_folder(world, theta0, tmp_path):
    adv = Lottery(settings(world, theta0, method="adv-imp", sparsity=0.2), runs=tmp_path)
    imp = Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path)
    assert adv.settings.train.adversarial == AdversarialSettings()
    assert imp.settings.train.adversarial is None
    assert adv.folder != imp.folder
    # IMP with adversarial fine-tuning asked for explicitly is a run of its own too.
    explicit = settings(world, theta0, adversarial=AdversarialSettings(), sparsity=0.2)
    assert Lottery(explicit, runs=tmp_path).folder not in (adv.folder, imp.folder)
    report = adv.run()
    assert [round(r["sparsity"], 2) for r in report["rounds"]] == [0.0, 0.1, 0.2]
    config = json.loads((adv.folder / "config.json").read_text())
    assert config["train"]["adversarial"]["steps"] == 3
    assert "adversarial" not in imp.config["train"]


def cli_args(world, theta0, command, *extra) -> list[str]:
    return [
        *(command, "--task", "nlvr2", "--checkpoint", str(theta0), "--data", str(world)),
        *("--steps", "2", "--batch-size", "8", "--quiet"),
        *extra,
    ]


def test_cli_adv_imp_and_adversarial_evaluate(world, theta0, tmp_path):
    runs = tmp_path / "runs"
    found = CliRunner().invoke(
        cli,
        cli_args(
            world,
            theta0,
            "find",
            "--method",
            "adv-imp",
            "--adv-steps",
            "2",
            "--adv-lr",
            "0.01",
            "--schedule",
            "geometric",
            "--rate",
            "0.5",
            "--sparsity",
            "0.5",
            "--runs",
            str(runs),
            "--json",
        ),
    )
    assert found.exit_code == 0, found.output
    report = json.loads(found.stdout)
    assert report["method"] == "adv-imp"
    config = json.loads((runs / report["run"] / "config.json").read_text())
    assert config["train"]["adversarial"] == {
        "steps": 2,
        "lr": 0.01,
        "max_norm": 0.0,
        "kl": 1.5,
        "modality": "both",
    }
    ticket = report["final"]["ticket"]
    scored = CliRunner().invoke(
        cli, cli_args(world, theta0, "evaluate", "--ticket", ticket, "--adversarial")
    )
    assert scored.exit_code == 0, scored.output
    assert scored.output.strip().endswith("(adversarial)")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--adv-steps", "2"), "--adv-steps needs --adversarial"),
        (("--adversarial", "--adv-steps", "0"), "--adv-steps must be at least 1"),
        (("--adversarial", "--adv-lr", "0"), "'--adv-lr': 0.0 is not in the range x>0"),
        (("--adversarial", "--adv-max-norm", "-1"), "--adv-max-norm"),
        (("--adversarial", "--adv-kl", "-1"), "--adv-kl"),
    ],
)
def test_bad_adversarial_flags_fail_in_one_line(world, theta0, tmp_path, flags, message):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, cli_args(world, theta0, "find", "--runs", str(runs), *flags))
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not runs.exists()


def test_settings_reject_an_unknown_modality():
    with pytest.raises(VLPruneError, match="--adv-modality"):
        AdversarialSettings(modality="audio")
