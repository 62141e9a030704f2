"""What loading a UNITER checkpoint reports: head keys ignored, buffers accepted, keys renamed to
fit, embeddings grown; every gap an error listing what is missing; and the CLI printing the report
and the data it read on stderr, apart from its JSON on stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from uniter_release import write_uniter_checkpoint

import vl_prune_plugins.world.splits.nlvr2 as nlvr2_world
from vl_prune.errors import VLPruneError
from vl_prune.pruning import GlobalMagnitude
from vl_prune.ticket import Ticket, current_weights, fingerprint
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.world.vocabulary import words

SMALL = dict(hidden=32, layers=2, heads=2, intermediate=64, vocab=300, img_dim=40, max_position=64)
HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
NORM = re.compile(r"(LayerNorm|layer_norm)\.(weight|bias)$")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in the layout of UNITER's released uniter-base.pt (with its pre-training
    heads) at small widths, and what it holds."""
    path = tmp_path_factory.mktemp("release") / "uniter-small.pt"
    return path, write_uniter_checkpoint(path, **SMALL)


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("uniter."): v for k, v in state.items() if k.startswith("uniter.")}


def assert_loaded(model: Uniter, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    expected = backbone_of(state)
    assert own.keys() == expected.keys()
    assert all(torch.equal(own[k], expected[k]) for k in own)


# Reports -------------------------------------------------------------------------------------


def test_release_checkpoint_loads_with_its_heads_reported_as_ignored(release):
    path, state = release
    model = Uniter.build(checkpoint=path)
    assert_loaded(model, state)
    report = model.load_report
    heads = [k for k in state if k.startswith(HEADS)]
    assert sorted(report.ignored) == sorted(heads) and len(heads) == 20
    assert (report.converted, report.accepted, report.grown) == ([], [], [])
    assert str(report) == (
        f"loaded {path}: ignored 20 non-backbone keys "
        "(cls, feat_regress, itm_output, region_classifier)"
    )


def test_backbone_only_checkpoint_reports_every_key_used(release, tmp_path):
    _, state = release
    path = save(backbone_of(state), tmp_path / "bare.pt")
    model = Uniter.build(checkpoint=path)
    assert_loaded(model, state)
    assert str(model.load_report) == f"loaded {path}: every key used"


def test_position_and_token_type_id_buffers_are_accepted_and_reported(release, tmp_path):
    _, state = release
    with_buffers = {
        **state,
        "uniter.embeddings.position_ids": torch.arange(SMALL["max_position"])[None],
        "uniter.embeddings.token_type_ids": torch.zeros(1, SMALL["max_position"], dtype=torch.long),
    }
    path = save(with_buffers, tmp_path / "buffers.pt")
    model = Uniter.build(checkpoint=path)
    assert_loaded(model, state)
    report = model.load_report
    assert sorted(report.accepted) == [
        "uniter.embeddings.position_ids",
        "uniter.embeddings.token_type_ids",
    ]
    assert not any("position_ids" in k or "token_type_ids" in k for k in report.ignored)
    assert "accepted uniter.embeddings.position_ids" in str(report)
    assert "(buffers; not loaded)" in str(report)
    # Shapes alone (what is read before the weights) accept them too.
    assert Uniter.inputs(checkpoint=path).vocab_size == SMALL["vocab"]


def test_layernorm_gamma_beta_are_converted_and_reported(release, tmp_path):
    _, state = release
    renamed = {
        NORM.sub(lambda m: f"{m[1]}.{'gamma' if m[2] == 'weight' else 'beta'}", k): v
        for k, v in state.items()
    }
    backbone_norms = sum(bool(NORM.search(k)) for k in state if k.startswith("uniter."))
    assert backbone_norms == 2 * (4 + 2 * SMALL["layers"])
    path = save(renamed, tmp_path / "gamma-beta.pt")
    model = Uniter.build(checkpoint=path)
    assert_loaded(model, state)
    assert model.load_report.converted == [f"{backbone_norms} LayerNorm gamma/beta → weight/bias"]
    assert f"converted {backbone_norms} LayerNorm gamma/beta → weight/bias" in str(
        model.load_report
    )


def test_dataparallel_module_prefixes_are_converted_and_reported(release, tmp_path):
    _, state = release
    path = save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pt")
    model = Uniter.build(checkpoint=path)
    assert_loaded(model, state)
    report = model.load_report
    assert report.converted == [f"{len(state)} 'module.' prefixes (DataParallel) dropped"]
    assert len(report.ignored) == 20
    assert all(not k.startswith("module.") for k in report.ignored)


def test_grown_embeddings_are_reported(release):
    path, _ = release
    model = Uniter.build(checkpoint=path)
    model.ensure_image_types(2)
    model.ensure_vocabulary(SMALL["vocab"] + 81)
    model.ensure_vocabulary(SMALL["vocab"])  # already there: nothing more to report
    assert model.load_report.grown == [
        "token type embeddings 2 → 3 rows",
        f"word embeddings {SMALL['vocab']} → {SMALL['vocab'] + 81} rows",
    ]
    assert str(model.load_report).endswith(
        f"; grew token type embeddings 2 → 3 rows, word embeddings {SMALL['vocab']} → "
        f"{SMALL['vocab'] + 81} rows"
    )


# Errors --------------------------------------------------------------------------------------


def test_missing_keys_are_counted_and_the_first_ten_listed(release, tmp_path):
    _, state = release
    layer = [k for k in state if k.startswith("uniter.encoder.layer.1.")]
    dropped = sorted(layer[:12])
    path = save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "gaps.pt")
    with pytest.raises(VLPruneError) as error:
        Uniter.build(checkpoint=path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: 12 backbone keys are missing: ")
    assert ", ".join(dropped[:10]) in message
    assert message.endswith("(2 more)")
    assert not any(key in message for key in dropped[10:])


def test_one_missing_key_is_named(release, tmp_path):
    _, state = release
    key = "uniter.pooler.dense.bias"
    path = save({k: v for k, v in state.items() if k != key}, tmp_path / "one-gap.pt")
    with pytest.raises(VLPruneError, match=re.escape(f"1 backbone key is missing: {key}")):
        Uniter.build(checkpoint=path)


@pytest.mark.parametrize("preset", [None, "tiny"])
def test_embeddings_only_checkpoint_is_a_clear_one_line_error(release, tmp_path, preset):
    _, state = release
    only = {k: v for k, v in state.items() if k.startswith("uniter.embeddings.")}
    path = save(only, tmp_path / "embeddings.pt")
    with pytest.raises(VLPruneError) as error:
        Uniter.build(preset, checkpoint=path)
    message = str(error.value)
    assert "\n" not in message
    assert "uniter." in message
    assert not re.search(r"max\(\)|arg is an empty|KeyError|NoneType|Traceback", message)


def test_foreign_checkpoint_is_not_a_uniter_checkpoint(tmp_path):
    path = save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, tmp_path / "b.pt")
    with pytest.raises(VLPruneError, match=r"no uniter\.embeddings: not a UNITER checkpoint"):
        Uniter.build(checkpoint=path)
    with pytest.raises(VLPruneError, match="not a UNITER checkpoint"):
        Uniter.inputs(checkpoint=path)


# The CLI: report and data on stderr, results on stdout -----------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nlvr2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2_world, "WORLD_SIZES", {"train": 16, "dev": 8})
        nlvr2_world.write(root)
    return root


def ticket_for(checkpoint: Path, out: Path) -> Path:
    model = Uniter.build(checkpoint=checkpoint)
    found = fingerprint(current_weights(model, model.prunable_names()))
    GlobalMagnitude.prune_group(model.prunable(), 0.3)
    ticket = Ticket.from_model(
        model,
        model.prunable(),
        backbone="uniter",
        preset=model.preset,
        task="nlvr2",
        weights_fingerprint=found,
    )
    ticket.save(out)
    return out


def evaluate(ticket: Path, checkpoint: Path, world: Path, *extra: str):
    return CliRunner().invoke(
        cli,
        [
            *("evaluate", "--ticket", str(ticket), "--task", "nlvr2"),
            *("--checkpoint", str(checkpoint), "--data", str(world), "--steps", "2"),
            *("--batch-size", "8", *extra),
        ],
    )


def test_evaluate_prints_load_report_and_data_on_stderr_and_json_on_stdout(
    world, theta0, tmp_path, one_thread
):
    ticket = ticket_for(theta0, tmp_path / "ticket.safetensors")
    result = evaluate(ticket, theta0, world, "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)  # nothing else on stdout
    assert scored["task"] == "nlvr2" and 0.0 <= scored["score"] <= 1.0
    assert scored["sparsity"] == pytest.approx(0.3, abs=1e-3)
    lines = result.stderr.splitlines()
    # NLVR2's second image type grows the token types: the report says so.
    assert f"loaded {theta0}: grew token type embeddings 2 → 3 rows" in lines
    data = [line for line in lines if line.startswith("data: ")]
    assert len(data) == 1
    assert data[0].startswith("data: nlvr2 train (16 examples), scored on ")
    assert "(8)" in data[0] and str(world.resolve()) in data[0]
    assert "loaded" not in result.stdout and "data:" not in result.stdout


def test_evaluate_prints_what_a_release_checkpoint_left_out(world, tmp_path, one_thread):
    # The release layout at the world's vocabulary and region width: trains in seconds.
    checkpoint = tmp_path / "uniter-release.pt"
    state = write_uniter_checkpoint(
        checkpoint, hidden=32, layers=1, intermediate=64, vocab=len(words()), img_dim=64
    )
    state["uniter.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(state, checkpoint)
    ticket = ticket_for(checkpoint, tmp_path / "ticket.safetensors")
    result = evaluate(ticket, checkpoint, world, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    report = next(line for line in result.stderr.splitlines() if line.startswith("loaded "))
    assert report == (
        f"loaded {checkpoint}: ignored 20 non-backbone keys "
        "(cls, feat_regress, itm_output, region_classifier); "
        "accepted uniter.embeddings.position_ids (buffers; not loaded); "
        "grew token type embeddings 2 → 3 rows"
    )


def test_evaluate_with_a_broken_checkpoint_is_one_line(world, release, tmp_path):
    _, state = release
    only = {k: v for k, v in state.items() if k.startswith("uniter.embeddings.")}
    checkpoint = save(only, tmp_path / "embeddings.pt")
    ticket = ticket_for(theta0_like(tmp_path), tmp_path / "ticket.safetensors")
    result = evaluate(ticket, checkpoint, world)
    assert result.exit_code == 2
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("vlprune: error:")]
    assert len(errors) == 1 and "uniter.encoder.layer" in errors[0]
    assert "Traceback" not in result.stderr and "max() arg" not in result.stderr


def theta0_like(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "other.safetensors"
    save_file(Uniter.build("tiny").state_dict(), path)
    return path
