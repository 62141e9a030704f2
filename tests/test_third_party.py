"""The README's plugin examples, really installed: tests/plugins/example-backbone (MiniVL) and
tests/plugins/example-task (Count and its world split), each a distribution of its own.

They meet their contracts, and `vlprune find` runs each end to end on the embedded world with no
--checkpoint and no --data: a third-party backbone on a built-in task (the world pre-trains its
θ0), and a built-in backbone on a third-party task (the world writes the task's split).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import vl_prune_plugins.world.splits.nlvr2 as nlvr2_split
import vl_prune_plugins.world.splits.pretrain as pretrain_split
from vl_prune import Ticket, registry
from vl_prune.data.fingerprint import data_fingerprint
from vl_prune.errors import VLPruneError
from vl_prune.ticket import current_weights, fingerprint
from vl_prune.train import TrainSettings
from vl_prune.world import embedded_world
from vl_prune_cli.main import cli
from vl_prune_plugins.world.synthetic import SyntheticWorld
from vl_prune_plugins.world.theta0 import pretrained_tiny

ROOT = Path(__file__).parents[1]
PLUGINS = ROOT / "tests" / "plugins"
#: a README code block that must be a file of the examples, byte for byte
SHOWN = re.compile(
    r"<!-- tests/test_third_party.py: this block is (\S+) -->\n```\w+\n(.*?)```", re.S
)
#: folder under tests/plugins → distribution, top-level package, the plugins it registers
DISTRIBUTIONS = {
    "example-backbone": (
        "vlprune-example-backbone",
        "vlprune_example_backbone",
        {("backbones", "minivl")},
    ),
    "example-task": (
        "vlprune-example-task",
        "vlprune_example_task",
        {("tasks", "count"), ("world_splits", "count")},
    ),
}
#: small world splits and a 3-step θ0 pre-training, as tests/distributed_find.py uses
WORLD = {"train": 48, "dev": 24}
THETA0 = TrainSettings(steps=3, batch_size=8, lr=1e-3, seed=5)
#: one pruned round (20%) after the dense one, two steps each
FIND = ("--steps", "2", "--batch-size", "8", "--sparsity", "0.2", "--schedule", "geometric")
TICKET = "ticket.safetensors"


@pytest.fixture(scope="module", autouse=True)
def site(tmp_path_factory) -> Path:
    """Both distributions installed by pip into a temporary folder, on sys.path and PYTHONPATH
    (θ0 is pre-trained in a spawned process, which must import the backbone too) for this
    module only. pip builds from copies, so tests/plugins/ is left without build files."""
    source = tmp_path_factory.mktemp("third-party-src")
    for folder in DISTRIBUTIONS:
        ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        shutil.copytree(PLUGINS / folder, source / folder, ignore=ignore)
    target = tmp_path_factory.mktemp("third-party-site")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--target", str(target)),
            *(str(source / folder) for folder in DISTRIBUTIONS),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    packages = {package for _, package, _ in DISTRIBUTIONS.values()}
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(target))
        path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        patch.setenv("PYTHONPATH", path)
        yield target
        for name in [m for m in sys.modules if m.partition(".")[0] in packages]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A fresh $VL_PRUNE_HOME with a small world and a θ0 pre-trained for 3 steps."""
    folder = tmp_path_factory.mktemp("vl-prune-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VL_PRUNE_HOME", str(folder))
        patch.setattr(nlvr2_split, "WORLD_SIZES", WORLD)
        patch.setattr(pretrain_split, "WORLD_SIZES", WORLD)
        patch.setattr(
            SyntheticWorld, "theta0", lambda world, cls, name: pretrained_tiny(cls, name, THETA0)
        )
        yield folder


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def find(runs: Path, model: str, task: str) -> tuple[Result, dict]:
    """`vlprune find` with no --checkpoint and no --data; the result and its JSON report."""
    result = invoke("find", "--model", model, "--task", task, *FIND, "--runs", str(runs), "--json")
    return result, json.loads(result.stdout)


def round_ticket(report: dict, r: int) -> Ticket:
    """Round r's ticket in the report's run folder (the final ticket may be any round's)."""
    seed = Path(report["final"]["ticket"]).parent / f"seed_{report['final']['seed']}"
    return Ticket.load(seed / f"round_{r:02d}" / TICKET)


@pytest.mark.parametrize("folder", DISTRIBUTIONS)
def test_each_example_is_its_own_installed_distribution_and_meets_its_contract(site, folder):
    distribution, package, expected = DISTRIBUTIONS[folder]
    found = {
        (kind, plugin.name): plugin
        for kind in registry.KINDS
        for plugin in registry.plugins(kind)
        if plugin.distribution == distribution
    }
    assert found.keys() == expected
    for (kind, name), plugin in found.items():
        registry.load(kind, name)
        module = sys.modules[plugin.target.partition(":")[0]]
        assert module.__name__.partition(".")[0] == package
        assert Path(module.__file__).is_relative_to(site)
        if kind != "world_splits":  # the world checks its splits where it uses them
            checked = invoke("check-plugin", name, "--kind", kind).output
            assert f"(from {distribution}) meets the contract" in checked


def test_find_prunes_the_example_backbone_from_the_theta0_the_world_pretrained(
    home, tmp_path, one_thread
):
    result, report = find(tmp_path, "minivl", "nlvr2")
    assert "No --checkpoint/--data: running minivl-tiny on the embedded world's nlvr2" in (
        result.stderr
    )
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert [r["sparsity"] for r in report["rounds"]] == pytest.approx([0.0, 0.2], abs=1e-3)
    assert (report["backbone"], report["preset"], report["task"]) == ("minivl", "tiny", "nlvr2")
    ticket = round_ticket(report, 1)
    meta = ticket.metadata
    assert (meta["backbone"], meta["preset"], meta["task"]) == ("minivl", "tiny", "nlvr2")
    # The world cached θ0 under the backbone's registry name; the ticket was found from it.
    (cached,) = (home / "theta0").glob("minivl-tiny-*.safetensors")
    MiniVL = registry.load("backbones", "minivl")
    theta0 = MiniVL.build("tiny", checkpoint=cached)
    names = theta0.prunable_names()
    assert sorted(ticket.masks) == sorted(names)
    assert meta["weights_fingerprint"] == fingerprint(current_weights(theta0, names))
    assert theta0.load_report.ignored == []


def test_find_runs_a_builtin_backbone_on_the_world_split_of_the_example_task(
    home, tmp_path, one_thread
):
    result, report = find(tmp_path, "uniter", "count")
    assert "running uniter-tiny on the embedded world's count" in result.stderr
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert (report["backbone"], report["task"], report["metric"]) == ("uniter", "count", "accuracy")
    meta = round_ticket(report, 1).metadata
    assert (meta["backbone"], meta["task"], meta["metric"]) == ("uniter", "count", "accuracy")
    assert [path.name for path in (home / "theta0").glob("uniter-tiny-*.safetensors")]
    # The data is the world split, cached by task, version and seed, read by Count's reader.
    config = json.loads((Path(report["final"]["ticket"]).parent / "config.json").read_text())
    split = home / "world" / "count-v1-seed0"
    assert config["data"] == data_fingerprint(split)
    assert len(json.loads((split / "count_train.json").read_text())["questions"]) == 64
    # Flags left unset come from the world split's recipe, not the task's one for real data.
    assert config["train"]["lr"] == 2e-3
    assert config["train"]["steps"] == 2


def test_the_example_task_feeds_pixels_to_a_pixel_backbone(home):
    Count = registry.load("tasks", "count")
    Vilt = registry.load("backbones", "vilt")
    task = Count(embedded_world().data("count"))
    examples = task.examples("dev")
    batch = task.collate(examples[:3], Vilt.inputs("tiny"))
    (inputs,) = batch.inputs
    side = embedded_world().image_size  # ViLT's tiny preset reads pictures at their size
    assert inputs.pixel_values.shape == (3, 3, side, side) and inputs.region_feats is None
    assert inputs.pixel_mask.shape == (3, side, side)
    assert torch.equal(batch.targets, torch.tensor([e.label for e in examples[:3]]))


def test_the_readme_shows_every_file_of_the_examples_as_it_is():
    shown = dict(SHOWN.findall((ROOT / "README.md").read_text(encoding="utf-8")))
    files = [
        path
        for folder in DISTRIBUTIONS
        for path in sorted((PLUGINS / folder).rglob("*"))
        if path.suffix in (".py", ".toml")
        and not {"build", "__pycache__"} & set(path.relative_to(PLUGINS).parts)
    ]
    assert sorted(shown) == sorted(path.relative_to(ROOT).as_posix() for path in files)
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        assert shown[name] == path.read_text(encoding="utf-8"), f"the README's {name} is stale"


def test_a_bad_annotation_names_its_file_and_question(tmp_path):
    Count = registry.load("tasks", "count")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    question = {"image_id": "a", "question": "are there two shapes ?", "answer": "maybe"}
    (tmp_path / "count_train.json").write_text(json.dumps({"questions": [question]}))
    with pytest.raises(VLPruneError, match=r"count_train.json: question 0: answer 'maybe' is not"):
        Count(tmp_path).examples("train")
