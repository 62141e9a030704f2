import json
import os
import subprocess

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from vl_prune import Ticket, __version__
from vl_prune.pruning import GlobalMagnitude
from vl_prune_cli.main import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def make_ticket(path, seed: int, amount: float = 0.5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    params = [(model[0], "weight"), (model[2], "weight")]
    GlobalMagnitude.prune_group(params, amount)
    ticket = Ticket.from_model(model, params, backbone="toy", task="demo", score=0.75)
    ticket.save(path)
    return ticket


def assert_one_line_error(result, text: str):
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlprune: error:")
    assert text in lines[0]
    assert "Traceback" not in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_console_script_is_installed():
    done = subprocess.run(["vlprune", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in done.stdout


def test_list_shows_builtin_methods_with_their_distribution():
    result = run("list", "methods")
    assert result.exit_code == 0
    for name in ("imp", "random", "layerwise"):
        line = next(x for x in result.output.splitlines() if x.split()[:1] == [name])
        assert "vl-prune" in line


def test_list_without_kind_shows_every_kind():
    result = run("list")
    assert result.exit_code == 0
    for kind in ("backbones:", "tasks:", "methods:"):
        assert kind in result.output


def test_inspect_prints_metadata_and_per_tensor_sparsity(tmp_path):
    ticket = make_ticket(tmp_path / "t.safetensors", seed=0)
    result = run("inspect", str(tmp_path / "t.safetensors"))
    assert result.exit_code == 0
    assert "toy" in result.output and "demo" in result.output
    assert "50.00%" in result.output
    for name, sparsity in ticket.layer_sparsity().items():
        row = next(x for x in result.output.splitlines() if x.startswith(name))
        assert f"{100 * sparsity:.2f}%" in row


def test_inspect_json(tmp_path):
    ticket = make_ticket(tmp_path / "t.safetensors", seed=0)
    out = json.loads(run("inspect", str(tmp_path / "t.safetensors"), "--json").output)
    assert out["metadata"]["backbone"] == "toy"
    assert out["pruned"] == ticket.pruned and out["weights"] == ticket.total
    assert out["tensors"]["0.weight"]["shape"] == [16, 8]


def test_compare_prints_the_iou_matrix_and_plots_it(tmp_path):
    a = make_ticket(tmp_path / "a.safetensors", seed=0)
    b = make_ticket(tmp_path / "b.safetensors", seed=1)
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    out = json.loads(run("compare", *paths, "--json").output)
    assert out["labels"] == ["a", "b"]
    assert out["iou"][0][0] == 1.0 and out["iou"][1][1] == 1.0
    assert out["iou"][0][1] == pytest.approx(a.iou(b))
    result = run("compare", *paths, "--plot", str(tmp_path / "iou.png"))
    assert result.exit_code == 0
    assert f"{a.iou(b):.3f}" in result.output
    assert (tmp_path / "iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_ticket_is_a_one_line_error(tmp_path):
    assert_one_line_error(run("inspect", str(tmp_path / "nope.safetensors")), "nope.safetensors")


def test_garbled_ticket_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"this is not a ticket")
    make_ticket(tmp_path / "good.safetensors", seed=0)
    result = run("compare", str(tmp_path / "good.safetensors"), str(tmp_path / "bad.safetensors"))
    assert_one_line_error(result, "bad.safetensors")


def test_compare_needs_two_tickets(tmp_path):
    make_ticket(tmp_path / "a.safetensors", seed=0)
    assert_one_line_error(run("compare", str(tmp_path / "a.safetensors")), "at least two")


def test_plot_into_a_missing_folder_is_a_one_line_error(tmp_path):
    for name in ("a", "b"):
        make_ticket(tmp_path / f"{name}.safetensors", seed=0)
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    result = run("compare", *paths, "--plot", str(tmp_path / "no" / "such" / "iou.png"))
    assert_one_line_error(result, "iou.png")


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "inspect", str(tmp_path / "nope.safetensors"))
    assert result.exit_code != 0 and result.exception is not None
    assert "no such ticket file" in str(result.exception)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, "5000"),  # OpenMP's threads sleep soon: jobs sharing the cores do not spin
        ({"GOMP_SPINCOUNT": "100"}, "100"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, None),  # the user's choice, untouched
    ],
)
def test_the_command_bounds_openmp_spinning_unless_told(monkeypatch, given, expected):
    import vl_prune_cli.main as entry

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")  # so that what `main` sets is undone after the test
        monkeypatch.delenv(name)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    seen = {}
    monkeypatch.setattr(entry, "cli", lambda **kwargs: seen.update(os.environ))
    entry.main()
    assert seen.get("GOMP_SPINCOUNT") == expected
