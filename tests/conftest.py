"""Shared fixtures: third-party plugin distributions, really pip-installed for the session, and
one-thread torch for tests that train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the example and the broken plugin distributions, installed by pip.

    Installed with --target rather than into the running environment, so a test run never
    leaves plugins behind; putting the folder on the path is how the tests "install" them.
    """
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--target", str(target)),
            *(str(PLUGINS / "example-method"), str(PLUGINS / "broken-method")),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return target


@pytest.fixture
def with_plugins(plugin_site, monkeypatch) -> Path:
    """The plugin distributions visible to this process and to its subprocesses."""
    monkeypatch.syspath_prepend(str(plugin_site))
    path = os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    return plugin_site


@pytest.fixture
def one_thread():
    """Train on one thread: a tiny model's matrices gain little from a second one, and OpenMP
    threads spin when other processes share the cores (measured here on 2 busy cores: 6 s a
    VQA step on two threads, 0.13 s on one; 20 s against 0.5 s for 4 RefCOCO+ steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: the small NLVR2 world split that tests of `find` and its relatives train on
SMALL_NLVR2 = {"train": 48, "dev": 24}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small NLVR2 split of the embedded world, written once per test module (a module that
    needs other sizes defines its own `world`)."""
    import vl_prune_plugins.world.splits.nlvr2 as nlvr2_world

    root = tmp_path_factory.mktemp("nlvr2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2_world, "WORLD_SIZES", SMALL_NLVR2)
        nlvr2_world.write(root)
    return root


@pytest.fixture(scope="module")
def theta0(tmp_path_factory) -> Path:
    """A freshly initialised tiny UNITER (seed 0) as a bare state dict, the layout vl_prune
    saves θ0 in: no test waits for the embedded θ0 to be pre-trained."""
    from vl_prune_plugins.backbones.uniter import Uniter

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("theta0") / "uniter-tiny.safetensors"
    save_file(Uniter.build("tiny").state_dict(), path)
    return path
