"""The plugin contract check: built-ins pass, each broken plugin fails in one line naming its
distribution and fault, and checking never touches the caller's random streams."""

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune import registry
from vl_prune.backbone import Backbone, VLOutput
from vl_prune.contract import (
    ContractError,
    check_backbone,
    check_method,
    check_task,
    load_checked,
    locate,
)
from vl_prune.errors import VLPruneError
from vl_prune.pruning import GlobalMagnitude, MethodAlias
from vl_prune.task import Task
from vl_prune.world import embedded_world

BAD_PLUGINS = Path(__file__).parent / "plugins" / "bad-plugins"
BUILTINS = {
    "backbones": ("uniter", "lxmert", "vilt"),
    "tasks": ("nlvr2", "pretrain", "vqa", "gqa", "snli-ve", "refcoco+", "retrieval", "vcr"),
    "methods": ("imp", "random", "layerwise", "oneshot", "rewind", "adv-imp"),
}
ERROR = "vlprune: error: {} plugin {!r} (from vlprune-bad-plugins) breaks the contract: {}\n"
#: `vlprune check-plugin NAME` on each plugin of tests/plugins/bad-plugins: exit code, stdout,
#: stderr
CLI_CASES = {
    "small": (0, "ok: backbone 'small' (from vlprune-bad-plugins) meets the contract\n", ""),
    "function-backbone": (
        2,
        "",
        ERROR.format(
            "backbone",
            "function-backbone",
            "vlprune_bad_plugins:make_backbone is a function, "
            "not a vl_prune.backbone.Backbone subclass",
        ),
    ),
    "wide-pooled": (
        2,
        "",
        ERROR.format("backbone", "wide-pooled", "pooled is 2 × 64, not 2 × 128 (hidden_size)"),
    ),
    "no-hidden": (
        2,
        "",
        ERROR.format(
            "backbone", "no-hidden", "NoHidden.build('tiny') has no attribute hidden_size"
        ),
    ),
    "no-metric": (
        2,
        "",
        ERROR.format("task", "no-metric", "metric is '', not the name of its primary score"),
    ),
}


@pytest.fixture(scope="module")
def bad_plugins(tmp_path_factory):
    """tests/plugins/bad-plugins installed by pip into a temporary folder, on PYTHONPATH for
    this module's subprocesses (pip builds from a copy, so tests/ gets no build/ or egg-info)."""
    source = tmp_path_factory.mktemp("bad-plugins-src") / "bad-plugins"
    shutil.copytree(
        BAD_PLUGINS, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = tmp_path_factory.mktemp("bad-plugins-site")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--target", str(target), str(source)),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    with pytest.MonkeyPatch.context() as patch:
        path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        patch.setenv("PYTHONPATH", path)
        yield target


def plugin(kind: str = "backbones", target: str = "tests:Probe") -> registry.Plugin:
    return registry.Plugin(kind, "probe", target, "probe-dist")


class Probe(Backbone):
    """A tiny region backbone that meets the contract; the variants below each break it."""

    presets = ("tiny",)
    image_input = "regions"

    def __init__(self):
        super().__init__()
        self.preset, self.hidden_size, self.img_dim, self.vocab_size = "tiny", 8, 4, 10
        self.words = nn.Embedding(10, 8)
        self.regions = nn.Linear(4, 8)

    @classmethod
    def build(cls, preset=None, checkpoint=None):
        return cls()

    def forward(self, batch, text_delta=None, image_delta=None):
        text = self.words(batch.input_ids)
        return VLOutput(text, self.regions(batch.region_feats), text[:, 0])

    def prunable(self):
        return [(self.regions, "weight")]


class BuildFails(Probe):
    @classmethod
    def build(cls, preset=None, checkpoint=None):
        raise RuntimeError("no weights\nfor tiny")


class ForeignPrunable(Probe):
    def prunable(self):
        return [(nn.Linear(2, 2), "weight")]


class NotAParameter(Probe):
    def prunable(self):
        return [(self.regions, "weights")]


class TupleOutput(Probe):
    def forward(self, batch, text_delta=None, image_delta=None):
        return tuple(vars(super().forward(batch)).values())


class ShortText(Probe):
    def forward(self, batch, text_delta=None, image_delta=None):
        out = super().forward(batch)
        return VLOutput(out.text_states[:, 1:], out.image_states, out.pooled)


class NoImageStates(Probe):
    def forward(self, batch, text_delta=None, image_delta=None):
        out = super().forward(batch)
        return VLOutput(out.text_states, out.image_states[:, :0], out.pooled)


class BasePresetOnly(BuildFails):
    presets = ("base",)


class PixelsProbe(Probe):
    image_input = "pixels"

    def forward(self, batch, text_delta=None, image_delta=None):
        side = embedded_world().image_size
        assert batch.pixel_values.shape == (2, 3, side, side), "not the world's image size"
        text = self.words(batch.input_ids)
        patches = batch.pixel_values.reshape(2, -1, 4)
        return VLOutput(text, self.regions(patches), text[:, 0])


class DrawsRandomNumbers(Probe):
    @classmethod
    def build(cls, preset=None, checkpoint=None):
        random.random(), np.random.rand()
        return cls()  # nn.Linear and nn.Embedding draw from torch's generator


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind, names in BUILTINS.items() for name in names]
)
def test_builtin_plugins_meet_their_contract(kind, name):
    assert load_checked(kind, name) is registry.load(kind, name)


@pytest.mark.parametrize("backbone", [Probe, BasePresetOnly, PixelsProbe])
def test_a_backbone_that_keeps_the_contract_passes(backbone):
    check_backbone(backbone, plugin())


@pytest.mark.parametrize(
    ("backbone", "fault"),
    [
        (len, "tests:Probe is a builtin_function_or_method, not a vl_prune.backbone.Backbone"),
        (nn.Linear, "tests:Probe is a class that does not subclass vl_prune.backbone.Backbone"),
        (type("ListPresets", (Probe,), {"presets": ["tiny"]}), "presets is ['tiny'], not a"),
        (type("Video", (Probe,), {"image_input": "video"}), "image_input is 'video', not"),
        (BuildFails, "BuildFails.build('tiny') raised RuntimeError: no weights for tiny"),
        (ForeignPrunable, "prunable() lists (Linear, 'weight'), a module outside the backbone"),
        (NotAParameter, "lists (Linear, 'weights'), which is no parameter of that module"),
        (TupleOutput, "forward returned a tuple, not a vl_prune.backbone.VLOutput"),
        (ShortText, "text_states is 2 × 5 × 8, not 2 × 6 × 8 (batch × tokens × hidden_size)"),
        (NoImageStates, "image_states is 2 × 0 × 8, not 2 × N × 8 (batch × regions or patches"),
    ],
)
def test_a_backbone_breaking_the_contract_is_named_in_one_line(backbone, fault):
    with pytest.raises(ContractError) as caught:
        check_backbone(backbone, plugin())
    message = str(caught.value)
    assert message.startswith("backbone plugin 'probe' (from probe-dist) breaks the contract: ")
    assert fault in message
    assert "\n" not in message


def test_checking_leaves_the_callers_random_streams_untouched():
    def draws():
        return torch.rand(3), random.random(), float(np.random.rand())

    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(7)
    expected = draws()
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(7)
    check_backbone(DrawsRandomNumbers, plugin())
    check_backbone(registry.load("backbones", "vilt"), registry.find("backbones", "vilt"))
    torch_draw, python_draw, numpy_draw = draws()
    assert torch.equal(torch_draw, expected[0])
    assert (python_draw, numpy_draw) == expected[1:]


def test_a_plugin_is_checked_once_per_process_and_a_failure_is_not_remembered(monkeypatch):
    import vl_prune.contract as contract

    calls = []

    def failing_once(loaded, found):
        calls.append(found.name)
        if len(calls) == 1:
            raise ContractError("broken")

    monkeypatch.setattr(contract, "check_method", failing_once)
    load_checked.cache_clear()
    try:
        with pytest.raises(ContractError, match="broken"):
            load_checked("methods", "imp")
        assert load_checked("methods", "imp") is load_checked("methods", "imp")
    finally:
        load_checked.cache_clear()
    assert calls == ["imp", "imp"]


class Complete(Task):
    """Implements every method the contract asks for; the variants break one thing each."""

    metric = "accuracy"
    recipe: ClassVar[dict] = {"steps": 10, "lr": 1e-4}

    def examples(self, split):
        return []

    def head(self, backbone):
        return nn.Identity()

    def collate(self, examples, backbone):
        return None

    def loss(self, outputs, targets):
        return outputs.sum()

    def predict(self, outputs):
        return outputs

    def score(self, predictions, targets):
        return 0.0


def test_a_task_that_keeps_the_contract_passes():
    check_task(Complete, plugin("tasks"))


@pytest.mark.parametrize(
    ("changes", "fault"),
    [
        ({"metric": ""}, "metric is '', not the name of its primary score"),
        ({"image_inputs": ()}, "image_inputs is (), not a tuple of 'regions' and/or 'pixels'"),
        ({"image_inputs": ("video",)}, "image_inputs is ('video',), not a tuple"),
        ({"splits": ("train",)}, "splits is ('train',), not a tuple of two or more names"),
        ({"recipe": {"epochs": 3, "lr": 1e-4}}, "recipe has 'epochs', not TrainSettings fields"),
        ({"loss": Task.loss, "score": Task.score}, "Broken does not implement loss, score"),
    ],
)
def test_a_task_breaking_the_contract_is_named(changes, fault):
    broken = type("Broken", (Complete,), changes)
    with pytest.raises(ContractError, match=r"^task plugin 'probe' \(from probe-dist\)") as caught:
        check_task(broken, plugin("tasks"))
    assert fault in str(caught.value)


def test_a_method_is_a_torch_pruning_method_or_an_alias():
    check_method(prune.L1Unstructured, plugin("methods"))
    check_method(MethodAlias("imp", "IMP, one-shot", one_shot=True), plugin("methods"))
    with pytest.raises(ContractError, match=r"is a class that does not subclass torch\.nn\.utils"):
        check_method(Probe, plugin("methods"))

    class Alias:
        pass

    with pytest.raises(ContractError, match=r"is an Alias, not a torch\.nn\.utils\.prune"):
        check_method(Alias(), plugin("methods"))


def test_locate_asks_for_the_kind_of_a_name_several_kinds_share(monkeypatch):
    shared = {k: [registry.Plugin(k, "twin", "x:Y", "d")] for k in ("backbones", "tasks")}
    monkeypatch.setattr(registry, "plugins", lambda kind: shared.get(kind, []))
    with pytest.raises(VLPruneError, match=r"pass --kind backbones or --kind tasks$"):
        locate("twin")
    assert locate("twin", "tasks") == shared["tasks"][0]


def test_locate_suggests_close_names_of_any_kind():
    with pytest.raises(VLPruneError, match="unknown plugin 'nlvr'; did you mean 'nlvr2'"):
        locate("nlvr")
    assert locate("adv-imp").kind == "methods"


@pytest.mark.parametrize("name", CLI_CASES)
def test_check_plugin_command(bad_plugins, tmp_path, name):
    code, out, err = CLI_CASES[name]
    home = tmp_path / "home"
    done = subprocess.run(
        ["vlprune", "check-plugin", name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "VL_PRUNE_HOME": str(home)},
    )
    assert (done.returncode, done.stdout, done.stderr) == (code, out, err)
    # Nothing is built on the way: no run folder, no cached data or θ0.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [name for name, case in CLI_CASES.items() if case[0] == 2])
def test_find_with_a_broken_plugin_stops_in_one_line_before_anything_is_built(
    bad_plugins, tmp_path, name
):
    code, _, err = CLI_CASES[name]
    model, task = (name, "nlvr2") if name != "no-metric" else ("uniter", name)
    started = time.perf_counter()
    done = subprocess.run(
        ["vlprune", "find", "--model", model, "--task", task, "--runs", "runs"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "VL_PRUNE_HOME": str(tmp_path / "home")},
    )
    assert (done.returncode, done.stderr) == (code, err)
    # Well before a world split or θ0 could be built; nothing is left behind.
    assert time.perf_counter() - started < 60
    assert list(tmp_path.iterdir()) == []


def test_an_alias_must_name_an_installed_rule_and_a_rule_must_not_steer_rounds():
    with pytest.raises(ContractError, match="it stands for method 'nope', which is not installed"):
        check_method(MethodAlias("nope", "IMP, differently"), plugin("methods"))

    class OldStyle(GlobalMagnitude):
        one_shot = True  # how vl_prune 0.1 said "one-shot": it would now run iterative IMP

    with pytest.raises(ContractError, match="OldStyle sets one_shot, which no longer steers"):
        check_method(OldStyle, plugin("methods"))
