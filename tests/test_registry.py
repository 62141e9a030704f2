import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from vl_prune import registry
from vl_prune.errors import VLPruneError


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout


def test_importing_vl_prune_loads_no_heavy_dependency_and_no_plugin():
    loaded = run_python(
        "import sys, vl_prune, vl_prune.registry as r; r.plugins('methods');"
        "print(' '.join(sys.modules))"
    ).split()
    for heavy in ["transformers", "accelerate", "peft", "torch", "vl_prune_plugins"]:
        assert heavy not in loaded
    assert "vl_prune.pruning" not in loaded, "listing entry points must not import them"


def test_builtin_methods_are_registered_by_the_vl_prune_distribution():
    found = {p.name: p for p in registry.plugins("methods")}
    assert {"imp", "random", "layerwise"} <= found.keys()
    assert {found[n].distribution for n in ("imp", "random", "layerwise")} == {"vl-prune"}


def test_load_returns_a_torch_pruning_method():
    method = registry.load("methods", "imp")
    assert issubclass(method, torch.nn.utils.prune.BasePruningMethod)


def test_unknown_name_lists_close_matches():
    with pytest.raises(VLPruneError, match=r"unknown method 'imq'.*did you mean 'imp'"):
        registry.find("methods", "imq")


def test_unknown_name_without_close_match_lists_what_is_known():
    with pytest.raises(VLPruneError, match=r"known: .*imp.*layerwise.*random"):
        registry.find("methods", "zzzzzz")


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(VLPruneError, match="unknown plugin kind 'widgets'"):
        registry.plugins("widgets")


def test_third_party_plugin_is_listed_with_its_distribution(with_plugins):
    rows = {row.plugin.name: row for row in registry.listing("methods")}
    assert rows["largest-first"].plugin.distribution == "vlprune-example-method"
    assert rows["largest-first"].description.startswith("Prunes the largest weights")
    assert rows["imp"].error is None


def test_third_party_method_prunes_through_the_shared_machinery(with_plugins):
    method = registry.load("methods", "largest-first")
    layer = nn.Linear(10, 10)
    method.prune_group([(layer, "weight")], 30)
    kept = layer.weight_orig.detach().abs()[layer.weight_mask]
    gone = layer.weight_orig.detach().abs()[~layer.weight_mask]
    assert gone.numel() == 30
    assert gone.min() >= kept.max()


def test_broken_plugin_is_reported_and_the_others_keep_working(with_plugins):
    rows = {row.plugin.name: row for row in registry.listing("methods")}
    assert "ImportError" in rows["broken"].error
    assert "needs a package that is not installed" in rows["broken"].error
    assert rows["imp"].error is None and rows["largest-first"].error is None
    with pytest.raises(registry.PluginLoadError, match=r"method plugin 'broken' \(from vlprune"):
        registry.load("methods", "broken")


def test_cli_lists_third_party_and_broken_plugins(with_plugins):
    done = subprocess.run(
        ["vlprune", "list", "methods", "--json"], capture_output=True, text=True, check=True
    )
    rows = {row["name"]: row for row in json.loads(done.stdout)["methods"]}
    assert rows["largest-first"]["distribution"] == "vlprune-example-method"
    assert rows["broken"]["error"].startswith("ImportError")
    assert rows["imp"]["distribution"] == "vl-prune"
