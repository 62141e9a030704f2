"""`vlprune find`, `evaluate` and `plot`: rounds, rewinding, baselines, resume, bad input.

Runs on a small NLVR2 world split and a freshly initialised tiny UNITER saved as a checkpoint,
so no test waits for the embedded θ0 to be pre-trained.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import vl_prune_plugins.tasks.nlvr2 as nlvr2
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.lottery import Lottery
from vl_prune.pruning import linear
from vl_prune.retrain import train_ticket
from vl_prune.ticket import Ticket, current_weights
from vl_prune.train import TrainSettings
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter


def settings(world, theta0, **overrides) -> FindSettings:
    train = TrainSettings(steps=overrides.pop("steps", 4), batch_size=8, eval_batch_size=24)
    return FindSettings(
        backbone="uniter",
        task="nlvr2",
        checkpoint=str(theta0),
        data=str(world),
        sparsity=overrides.pop("sparsity", 0.3),
        train=train,
        **overrides,
    )


def cli_args(world, theta0, runs, *extra) -> list[str]:
    return [
        *("find", "--model", "uniter", "--task", "nlvr2", "--checkpoint", str(theta0)),
        *("--data", str(world), "--batch-size", "8", "--runs", str(runs), "--quiet"),
        *extra,
    ]


def round_tickets(folder: Path) -> list[Ticket]:
    return [Ticket.load(p / "ticket.safetensors") for p in sorted(folder.glob("seed_*/round_*"))]


def test_imp_rounds_land_on_the_schedule_and_leave_report_curve_and_ticket(world, theta0, tmp_path):
    lottery = Lottery(settings(world, theta0), runs=tmp_path)
    report = lottery.run()
    tickets = round_tickets(lottery.folder)
    targets = linear(lottery.experiment.total, 0.3)
    assert [t.pruned for t in tickets] == [0, *targets]
    for r, ticket in enumerate(tickets):
        meta = ticket.metadata
        assert (meta["round"], meta["task"], meta["method"]) == (r, "nlvr2", "imp")
        assert meta["weights_fingerprint"] == lottery.experiment.fingerprint
        assert meta["score"] == report["rounds"][r]["score"]
        assert meta["dense_score"] == report["dense_score"]
        assert [h["round"] for h in meta["history"]] == list(range(r + 1))
    # Each IMP round prunes among the survivors of the last.
    for before, after in itertools.pairwise(tickets):
        assert all(bool((after.masks[n] <= before.masks[n]).all()) for n in before.masks)
    on_disk = json.loads((lottery.folder / "report.json").read_text())
    assert [r["sparsity"] for r in on_disk["rounds"]] == [t.sparsity for t in tickets]
    assert (lottery.folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = Ticket.load(lottery.folder / "ticket.safetensors")
    assert final.metadata["round"] == report["final"]["round"]
    holding = [r for r in report["rounds"] if r["score"] >= 0.99 * report["dense_score"]]
    assert report["final"]["sparsity"] == max(r["sparsity"] for r in holding)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("random", {}), ("oneshot", {}), ("rewind", {"rewind_step": 2}), ("layerwise", {})],
)
def test_every_method_reaches_the_exact_sparsities(world, theta0, tmp_path, method, extra):
    lottery = Lottery(settings(world, theta0, method=method, **extra), runs=tmp_path)
    lottery.run()
    targets = linear(lottery.experiment.total, 0.3)
    assert [t.pruned for t in round_tickets(lottery.folder)] == [0, *targets]


def test_geometric_schedule(world, theta0, tmp_path):
    found = settings(world, theta0, schedule="geometric", rate=0.25, sparsity=0.5)
    lottery = Lottery(found, runs=tmp_path)
    lottery.run()
    total = lottery.experiment.total
    pruned = [t.pruned for t in round_tickets(lottery.folder)]
    assert pruned == [0, round(0.25 * total), *pruned[2:]]
    assert pruned[-1] == round(0.5 * total)


def test_stop_below_ends_the_schedule_where_the_mean_curve_breaks(
    world, theta0, tmp_path, monkeypatch
):
    # Real rounds with scripted scores, in the order they train: round by round over the seeds.
    # Round 1 holds 93.75% on the mean (one seed at 87.5%); round 2 falls to 87.5%.
    scripted = iter([0.8, 0.8, 0.8, 0.7, 0.8, 0.6])
    real = Experiment.train

    def train(self, model, *args, **kwargs):
        _, trained = real(self, model, *args, **kwargs)
        return next(scripted), trained

    monkeypatch.setattr(Experiment, "train", train)
    args = cli_args(world, theta0, tmp_path, "--steps", "2", "--sparsity", "0.5", "--seeds", "2")
    result = CliRunner().invoke(cli, [*args, "--stop-below", "0.9"])
    assert result.exit_code == 0, result.output
    assert "stopped after round 2: below --stop-below 0.9 of dense, short of --sparsity 50" in (
        result.output
    )
    (folder,) = tmp_path.glob("uniter-nlvr2-*")
    report = json.loads((folder / "report.json").read_text())
    assert report["stopped_early"] is True
    assert [r["scores"] for r in report["rounds"]] == [[0.8, 0.8], [0.8, 0.7], [0.8, 0.6]]
    assert not list(folder.glob("seed_*/round_03/metrics.json"))
    finished = {p: p.stat().st_mtime_ns for p in folder.glob("seed_*/round_*/metrics.json")}

    # The same run without it goes on from round 3, keeping the rounds it has.
    monkeypatch.setattr(Experiment, "train", real)
    assert CliRunner().invoke(cli, args).exit_code == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["stopped_early"] is False
    assert [r["sparsity"] for r in report["rounds"]] == pytest.approx(
        [0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-3
    )
    assert report["rounds"][2]["scores"] == [0.8, 0.6]
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())


def test_finished_reads_the_report_of_finished_rounds_and_trains_nothing(
    world, theta0, tmp_path, monkeypatch
):
    lottery = Lottery(settings(world, theta0, steps=2, sparsity=0.5, seeds=2), runs=tmp_path)
    assert lottery.finished() is None  # nothing trained yet
    scripted = iter([0.8, 0.8, 0.8, 0.7, 0.8, 0.6])  # round 2 falls to 87.5% of dense
    real = Experiment.train

    def train(self, model, *args, **kwargs):
        _, trained = real(self, model, *args, **kwargs)
        return next(scripted), trained

    monkeypatch.setattr(Experiment, "train", train)
    report = lottery.run(stop_below=0.9)
    del report["seconds"]  # this invocation's, not the run's

    def refuse(*args, **kwargs):
        raise AssertionError("finished() trained a round")

    monkeypatch.setattr(Experiment, "train", refuse)
    assert lottery.finished(stop_below=0.9) == report
    assert lottery.finished(stop_below=0.8) is None  # that schedule goes on to round 3
    assert lottery.finished() is None


def test_random_masks_are_not_magnitude_masks(world, theta0, tmp_path):
    runs = {}
    for method in ("imp", "random"):
        lottery = Lottery(settings(world, theta0, method=method, sparsity=0.2), runs=tmp_path)
        lottery.run()
        runs[method] = round_tickets(lottery.folder)[-1]
    assert runs["imp"].sparsity == runs["random"].sparsity
    assert runs["imp"].iou(runs["random"]) < 0.95


def _starting_states(monkeypatch) -> list[dict]:
    """The model state every round starts training from, recorded."""
    seen = []
    train = Experiment.train

    def record(self, model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return train(self, model, *args, **kwargs)

    monkeypatch.setattr(Experiment, "train", record)
    return seen


def _plain(state: dict) -> dict:
    """Parameter values by plain name (a pruned weight's `_orig` under the weight's name)."""
    return {k.removesuffix("_orig"): v for k, v in state.items() if not k.endswith("_mask")}


def test_imp_resets_survivors_to_theta0_and_head_to_phi0(world, theta0, tmp_path, monkeypatch):
    seen = _starting_states(monkeypatch)
    lottery = Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path)
    lottery.run()
    untrained = lottery.experiment.fresh().state_dict()
    assert len(seen) == 3
    for state in seen:
        for name, value in _plain(state).items():
            assert torch.equal(value, untrained[name]), name
    # The rounds really did train: the dense run moved the weights.
    assert (
        lottery.experiment.fingerprint
        == Ticket.load(lottery.round_folder(1) / "ticket.safetensors").metadata[
            "weights_fingerprint"
        ]
    )


def test_rewind_resets_to_the_dense_run_after_k_steps(world, theta0, tmp_path, monkeypatch):
    seen = _starting_states(monkeypatch)
    found = settings(world, theta0, method="rewind", rewind_step=2, sparsity=0.2)
    lottery = Lottery(found, runs=tmp_path)
    lottery.run()
    rewound = load_file(lottery.round_folder(0) / "rewind.safetensors")
    untrained = lottery.experiment.fresh().state_dict()
    head = [k for k in rewound if k.startswith("head.")]
    assert any(not torch.equal(rewound[k], untrained[k]) for k in head)  # φ_k is not φ0
    for state in seen[1:]:
        for name, value in _plain(state).items():
            assert torch.equal(value, rewound[name]), name


def test_pruned_weights_stay_zero_through_adamw(world, theta0, tmp_path, monkeypatch):
    trained_models = []
    train = Experiment.train

    def keep(self, model, *args, **kwargs):
        score, trained = train(self, model, *args, **kwargs)
        trained_models.append(trained)
        return score, trained

    monkeypatch.setattr(Experiment, "train", keep)
    found = settings(world, theta0, sparsity=0.5, steps=6)
    found = FindSettings(**{**found.__dict__, "train": TrainSettings(steps=6, weight_decay=0.5)})
    Lottery(found, runs=tmp_path).run()
    pruned_model = trained_models[-1]
    batch = nlvr2.Nlvr2(world)
    pruned_model(batch.collate(batch.examples("dev")[:2], pruned_model.backbone))
    for module, name in pruned_model.backbone.prunable():
        mask = getattr(module, name + "_mask")
        assert not getattr(module, name)[~mask].any()
        # trained as zeros held in the parameter itself, which weight decay leaves at zero
        assert not getattr(module, name + "_orig")[~mask].any()
        assert name + "_orig" in module._parameters  # and torch's prune layout again after


def test_resume_after_sigkill_skips_finished_rounds_and_matches(world, theta0, tmp_path):
    common = ("--steps", "40", "--sparsity", "0.2", "--checkpoint-every", "3")
    runner = [sys.executable, "-m", "vl_prune_cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        [*runner, *cli_args(world, theta0, tmp_path / "a", *common)], env=env, capture_output=True
    )
    assert straight.returncode == 0, straight.stderr.decode()

    killed = subprocess.Popen([*runner, *cli_args(world, theta0, tmp_path / "b", *common)], env=env)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "b").glob("*/seed_*/round_01/checkpoint/latest")):
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (run,) = (tmp_path / "b").glob("uniter-*")
    (seed,) = run.glob("seed_*")  # the task recipe's seed
    assert not (seed / "round_01" / "metrics.json").exists()
    finished = (seed / "round_00" / "metrics.json").stat().st_mtime_ns
    # What a kill between a round's metrics.json and the deletion of its training state
    # leaves, and a kill inside atomic_write: both are gone after the rerun.
    shutil.copytree(seed / "round_01" / "checkpoint", seed / "round_00" / "checkpoint")
    (seed / "round_00" / ".ticket.safetensors.a1b2c3d4.tmp").write_bytes(b"partial")

    resumed = subprocess.run(
        [*runner, *cli_args(world, theta0, tmp_path / "b", *common)], env=env, capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert (seed / "round_00" / "metrics.json").stat().st_mtime_ns == finished
    assert not list(run.rglob("checkpoint")) and not list(run.rglob("*.tmp"))
    (reference,) = (tmp_path / "a").glob("uniter-nlvr2-*")
    assert reference.name == run.name
    for mine, theirs in zip(round_tickets(run), round_tickets(reference), strict=True):
        assert mine.masks.keys() == theirs.masks.keys()
        assert all(torch.equal(mine.masks[n], theirs.masks[n]) for n in mine.masks)
        assert mine.metadata["score"] == theirs.metadata["score"]


def test_nan_loss_stops_with_a_message_and_keeps_finished_rounds(
    world, theta0, tmp_path, monkeypatch
):
    lottery = Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path)
    loss = nlvr2.Nlvr2.loss
    calls = {"n": 0}

    def poisoned(self, logits, targets):
        calls["n"] += 1
        value = loss(self, logits, targets)
        return value * float("nan") if calls["n"] > 4 else value  # round 0 has 4 steps

    monkeypatch.setattr(nlvr2.Nlvr2, "loss", poisoned)
    with pytest.raises(VLPruneError, match="loss became nan"):
        lottery.run()
    done = lottery.round_folder(0) / "metrics.json"
    assert done.is_file()
    assert (lottery.round_folder(1) / "ticket.safetensors").is_file()
    assert not (lottery.round_folder(1) / "metrics.json").exists()
    stamp = done.stat().st_mtime_ns
    monkeypatch.setattr(nlvr2.Nlvr2, "loss", loss)
    report = lottery.run()
    assert done.stat().st_mtime_ns == stamp
    assert len(report["rounds"]) == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--sparsity", "0"), "--sparsity"),
        (("--sparsity", "1"), "--sparsity"),
        (("--sparsity", "-0.5"), "--sparsity"),
        (("--method", "bogus"), "bogus"),
        (("--method", "rewind"), "--rewind-step"),
        (("--steps", "0"), "steps"),
        (("--checkpoint-every", "0"), "--checkpoint-every"),
        (("--stop-below", "0"), "--stop-below"),
        (("--stop-below", "0.995"), "--stop-below must be in (0, --keep 0.99]"),
        (("--out", "/nonexistent/folder/t.safetensors"), "--out"),
    ],
)
def test_bad_flags_fail_in_one_line_and_write_nothing(world, theta0, tmp_path, flags, message):
    result = CliRunner().invoke(cli, cli_args(world, theta0, tmp_path / "runs", *flags))
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_unknown_model_task_and_unreadable_inputs(world, theta0, tmp_path):
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (["--model", "uniterr"], "uniterr"),
        (["--task", "nlvr3"], "nlvr3"),
        (["--checkpoint", str(garbage)], "broken.pt"),
        (["--data", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for change, message in cases:
        args = cli_args(world, theta0, tmp_path / "runs")
        flag = args.index(change[0])
        args[flag + 1] = change[1]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, change
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()


def test_find_cli_then_evaluate_and_plot(world, theta0, tmp_path):
    runner = CliRunner()
    out = tmp_path / "final.safetensors"
    args = cli_args(world, theta0, tmp_path / "runs", "--steps", "4", "--sparsity", "0.2")
    found = runner.invoke(cli, [*args, "--out", str(out), "--json"])
    assert found.exit_code == 0, found.output
    report = json.loads(found.output)
    assert Ticket.load(out).metadata["round"] == report["final"]["round"]
    baseline = runner.invoke(cli, [*args, "--method", "random"])
    assert baseline.exit_code == 0, baseline.output

    seed = Path(report["final"]["ticket"]).parent / f"seed_{report['final']['seed']}"
    round_2 = seed / "round_02" / "ticket.safetensors"
    evaluated = runner.invoke(
        cli,
        [
            *("evaluate", "--ticket", str(round_2), "--task", "nlvr2"),
            *("--checkpoint", str(theta0), "--data", str(world), "--steps", "4", "--json"),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)
    # The checkpoint's load report and what data was read go to stderr.
    assert f"loaded {theta0}: grew token type embeddings 2 → 3 rows" in evaluated.stderr
    assert "data: nlvr2 train (" in evaluated.stderr
    assert result["sparsity"] == pytest.approx(0.2, abs=1e-3)
    assert 0.0 <= result["score"] <= 1.0

    runs = sorted((tmp_path / "runs").glob("uniter-nlvr2-*"))
    plotted = runner.invoke(cli, ["plot", *map(str, runs), "--out", str(tmp_path / "c.png")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    missing = runner.invoke(cli, ["plot", str(tmp_path)])
    assert missing.exit_code == 2
    assert "report.json" in missing.output


def test_evaluate_refuses_a_ticket_from_other_weights(world, theta0, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_file(Uniter.build("tiny").state_dict(), other)
    lottery = Lottery(settings(world, theta0, sparsity=0.1), runs=tmp_path / "runs")
    lottery.run()
    ticket = lottery.round_folder(1) / "ticket.safetensors"
    base = ["evaluate", "--ticket", str(ticket), "--task", "nlvr2", "--data", str(world)]
    base += ["--checkpoint", str(other), "--steps", "2"]
    refused = CliRunner().invoke(cli, base)
    assert refused.exit_code == 2
    assert "--force" in refused.output
    forced = CliRunner().invoke(cli, [*base, "--force"])
    assert forced.exit_code == 0, forced.output


def test_shuffled_weights_baseline_permutes_theta0_within_each_tensor(
    world, theta0, tmp_path, monkeypatch
):
    lottery = Lottery(settings(world, theta0, sparsity=0.1), runs=tmp_path / "runs")
    lottery.run()
    ticket = Ticket.load(lottery.round_folder(1) / "ticket.safetensors")
    template = lottery.experiment.fresh().backbone
    started = {}

    def capture(self, model, *args, **kwargs):
        started.update(
            {n: w.clone() for n, w in current_weights(model.backbone, ticket.masks).items()}
        )
        return 0.5, model

    monkeypatch.setattr(Experiment, "train", capture)
    result = train_ticket(ticket, settings(world, theta0), weights="shuffled")
    assert result["weights"] == "shuffled"
    original = current_weights(template, ticket.masks)
    for name, weight in started.items():
        # The same values in another order: the layer's distribution, not its structure.
        assert torch.equal(weight.flatten().sort().values, original[name].flatten().sort().values)
        assert not torch.equal(weight, original[name])
    cli_result = CliRunner().invoke(
        cli,
        [
            *("evaluate", "--ticket", str(lottery.round_folder(1) / "ticket.safetensors")),
            *("--task", "nlvr2", "--data", str(world), "--checkpoint", str(theta0)),
            *("--weights", "shuffled", "--finetuned", str(theta0)),
        ],
    )
    assert cli_result.exit_code == 2
    assert "--finetuned trains nothing" in cli_result.output


def bert_weights(path: Path, drop: str | None = None) -> Path:
    """A BERT checkpoint of uniter-tiny's text shapes, in BertForPreTraining's key layout."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(7)
    tiny = Uniter.build("tiny")
    config = BertConfig(
        vocab_size=tiny.embeddings.word_embeddings.num_embeddings,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    state = {f"bert.{k}": v for k, v in BertModel(config).state_dict().items() if k != drop}
    save_file(state, path)
    return path


def test_another_pretrained_set_replaces_theta0_where_names_match(
    world, theta0, tmp_path, monkeypatch
):
    lottery = Lottery(settings(world, theta0, sparsity=0.1), runs=tmp_path / "runs")
    lottery.run()
    path = lottery.round_folder(1) / "ticket.safetensors"
    ticket = Ticket.load(path)
    bert = load_file(bert_weights(tmp_path / "bert.safetensors"))
    started = {}

    def capture(self, model, *args, **kwargs):
        started.update({n: p.detach().clone() for n, p in model.backbone.named_parameters()})
        return 0.5, model

    monkeypatch.setattr(Experiment, "train", capture)
    result = train_ticket(
        ticket, settings(world, theta0), weights=str(tmp_path / "bert.safetensors")
    )
    template = dict(lottery.experiment.fresh().backbone.named_parameters())
    for name in ticket.masks:  # every prunable tensor is BERT's
        assert torch.equal(started[name + "_orig"], bert["bert." + name])
    # No image embeddings in BERT, and NLVR2's third token type does not fit BERT's two.
    kept = result["replaced"]["kept"]
    assert "embeddings.token_type_embeddings.weight" in kept
    assert all(n in kept for n in template if n.startswith("img_embeddings."))
    for name in kept:
        assert torch.equal(started[name], template[name])
    assert torch.equal(
        started["embeddings.word_embeddings.weight"], bert["bert.embeddings.word_embeddings.weight"]
    )

    monkeypatch.undo()
    args = [
        *("evaluate", "--ticket", str(path), "--task", "nlvr2", "--data", str(world)),
        *("--checkpoint", str(theta0), "--steps", "2", "--batch-size", "8", "--quiet"),
    ]
    scored = CliRunner().invoke(cli, [*args, "--weights", str(tmp_path / "bert.safetensors")])
    assert scored.exit_code == 0, scored.output
    assert (
        f"from {tmp_path / 'bert.safetensors'} ({len(kept)} tensors kept from θ0)" in scored.output
    )
    query = "encoder.layer.2.attention.self.query.weight"
    partial = bert_weights(tmp_path / "partial.safetensors", drop=query)
    for weights, message in [(partial, repr(query)), (tmp_path / "none.pt", "no such file")]:
        failed = CliRunner().invoke(cli, [*args, "--weights", str(weights)])
        assert failed.exit_code == 2
        assert message in failed.output and len(failed.output.strip().splitlines()) == 1


def test_scoring_finetuned_weights(world, theta0, tmp_path):
    torch.manual_seed(0)
    model = Experiment(settings(world, theta0)).fresh()
    weights = tmp_path / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    result = CliRunner().invoke(
        cli,
        [
            *("evaluate", "--finetuned", str(weights), "--task", "nlvr2"),
            *("--checkpoint", str(theta0), "--data", str(world), "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sparsity"] == 0.0


def test_redoing_a_round_redoes_the_rounds_that_derive_from_it(world, theta0, tmp_path):
    lottery = Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path)
    lottery.run()
    before = round_tickets(lottery.folder)
    last = lottery.round_folder(2) / "metrics.json"
    stamp = last.stat().st_mtime_ns
    shutil.rmtree(lottery.round_folder(1))  # its mask came from round 0: gone with it
    with pytest.raises(VLPruneError, match=r"delete .*round_00"):
        Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path).run()
    shutil.rmtree(lottery.round_folder(0))
    Lottery(settings(world, theta0, sparsity=0.2), runs=tmp_path).run()
    assert last.stat().st_mtime_ns != stamp  # round 2 was trained again, not taken as done
    after = round_tickets(lottery.folder)
    for old, new in zip(before, after, strict=True):
        assert all(torch.equal(old.masks[n], new.masks[n]) for n in old.masks)


@pytest.mark.parametrize("command", ["evaluate", "transfer"])
def test_a_ticket_of_another_backbone_is_refused_before_any_weights(tmp_path, monkeypatch, command):
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    path = tmp_path / "t.safetensors"
    Ticket(
        {"pooler.dense.weight": torch.ones(2, 2, dtype=torch.bool)}, {"backbone": "uniter"}
    ).save(path)
    args = [command, "--ticket", str(path), "--task", "nlvr2", "--model", "lxmert"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "vlprune: error: the ticket was found on uniter, not lxmert: drop --model or pass "
        "--model uniter"
    )
    assert not (tmp_path / "home").exists()  # no world, no θ0


def test_one_shot_is_a_setting_any_method_takes(world, theta0, tmp_path):
    alias = Lottery(settings(world, theta0, method="oneshot", sparsity=0.2), runs=tmp_path)
    flag = Lottery(settings(world, theta0, one_shot=True, sparsity=0.2), runs=tmp_path)
    layerwise = settings(world, theta0, method="layerwise", one_shot=True, sparsity=0.2)
    assert alias.folder.name.startswith("uniter-nlvr2-oneshot-")
    assert flag.folder.name.startswith("uniter-nlvr2-imp-oneshot-")
    assert Lottery(layerwise, runs=tmp_path).folder.name.startswith(
        "uniter-nlvr2-layerwise-oneshot-"
    )
    reports = [alias.run(), flag.run()]
    assert [r["score"] for r in reports[0]["rounds"]] == [r["score"] for r in reports[1]["rounds"]]
    for mine, theirs in zip(*(round_tickets(lot.folder) for lot in (alias, flag)), strict=True):
        assert all(torch.equal(mine.masks[n], theirs.masks[n]) for n in mine.masks)
    assert reports[1]["method"] == "imp-oneshot"


def test_random_masks_rewind_too(world, theta0, tmp_path, monkeypatch):
    seen = _starting_states(monkeypatch)
    found = settings(world, theta0, method="random", rewind_step=2, sparsity=0.2)
    lottery = Lottery(found, runs=tmp_path)
    assert lottery.folder.name.startswith("uniter-nlvr2-random-rewind-")
    lottery.run()
    rewound = load_file(lottery.round_folder(0) / "rewind.safetensors")
    assert len(seen) == 3
    for state in seen[1:]:
        for name, value in _plain(state).items():
            assert torch.equal(value, rewound[name]), name


def test_transfer_refuses_tickets_of_two_backbones(tmp_path, monkeypatch):
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    args = ["transfer", "--task", "nlvr2"]
    for backbone in ("uniter", "lxmert"):
        path = tmp_path / f"{backbone}.safetensors"
        mask = {"pooler.dense.weight": torch.ones(2, 2, dtype=torch.bool)}
        Ticket(mask, {"backbone": backbone}).save(path)
        args += ["--ticket", str(path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "vlprune: error: the tickets were found on lxmert and uniter: give tickets of one backbone"
    )
    assert not (tmp_path / "home").exists()


def test_threads_train_at_their_count_and_name_the_run(world, theta0, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        base = settings(world, theta0)
        one = FindSettings(**{**base.__dict__, "train": replace(base.train, threads=1)})
        experiment = Experiment(one)
        seen = []
        experiment.train(
            experiment.fresh(),
            "probe",
            quiet=True,
            on_step=lambda *_: seen.append(torch.get_num_threads()),
        )
        assert set(seen) == {1} and torch.get_num_threads() == 2  # restored after
        # A set count is part of the identity (CPU sums depend on it); unset, names stay.
        assert Lottery(one, runs=tmp_path).folder != Lottery(base, runs=tmp_path).folder
        assert "threads" not in base.identity()["train"]
    finally:
        torch.set_num_threads(before)
