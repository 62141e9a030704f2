"""The dependency rules of DESIGN.md, read off the source with `ast`, so nothing is imported:
`cli → vl_prune ← plugins`; the world writes the tasks' splits (world → tasks), never tasks →
world or backbones → tasks or world; third-party examples use the public contract only. And
importing the core stays cheap: no transformers, accelerate, peft or plugin until one is used.

Every import counts, wherever it is: inside functions, under `if TYPE_CHECKING:`, relative.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).parents[1]
#: source folders that install under another name (pyproject.toml's package-dir)
INSTALLED_AS = {"vl_prune": "vl_prune", "plugins": "vl_prune_plugins", "cli": "vl_prune_cli"}
#: folders of build output, never source
SKIPPED = ("build", "__pycache__")


@dataclass(frozen=True)
class Rule:
    """Files under `folder` (a repository path ending in /) import none of `forbidden` (module
    names, each with its submodules)."""

    folder: str
    forbidden: tuple[str, ...]
    why: str

    def breaches(self, path: str, source: str) -> list[str]:
        """`path:line imports module` for each line of `source` (the file at repository path
        `path`) that imports a forbidden module."""
        found: dict[int, str] = {}
        for line, module in imports(source, package_of(path)):
            if any(module == f or module.startswith(f"{f}.") for f in self.forbidden):
                found.setdefault(line, module)
        return [f"{path}:{line} imports {module}" for line, module in sorted(found.items())]


RULES = (
    Rule("vl_prune/", ("vl_prune_plugins", "vl_prune_cli"), "the core finds plugins by registry"),
    Rule("plugins/", ("vl_prune_cli",), "plugins serve the core; the CLI only calls it"),
    Rule(
        "plugins/backbones/",
        ("vl_prune_plugins.tasks", "vl_prune_plugins.world"),
        "a backbone reads the world through vl_prune.world",
    ),
    Rule("plugins/tasks/", ("vl_prune_plugins.world",), "the world writes the tasks' splits"),
    Rule("examples/", ("vl_prune_plugins", "vl_prune_cli"), "examples use the public contract"),
    Rule("tests/plugins/", ("vl_prune_plugins", "vl_prune_cli"), "they stand for third parties"),
)


def imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`.
    `from a import b` counts as importing `a` and `a.b`, since `b` may be a submodule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level, package)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return found


def absolute(module: str | None, level: int, package: str) -> str:
    """The module a `from` import names: relative ones (level ≥ 1) resolved from `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".") if package else []
    base = parts[: len(parts) - (level - 1)] if level - 1 <= len(parts) else []
    return ".".join([*base, *([module] if module else [])])


def package_of(path: str) -> str:
    """The package a source file at repository path `path` belongs to, as installed:
    `plugins/tasks/nlvr2.py` → vl_prune_plugins.tasks; a distribution's files under examples/
    or tests/plugins/ by their folders inside the distribution."""
    parts = PurePosixPath(path).parts[:-1]
    if parts and parts[0] in INSTALLED_AS:
        parts = (INSTALLED_AS[parts[0]], *parts[1:])
    elif parts[:1] == ("examples",):
        parts = parts[2:]
    elif parts[:2] == ("tests", "plugins"):
        parts = parts[3:]
    return ".".join(parts)


def sources(folder: str) -> dict[str, str]:
    """Repository path → text of every .py file under `folder`, build output left out."""
    files = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT)
        if not any(p in SKIPPED or p.endswith(".egg-info") for p in relative.parts):
            files[relative.as_posix()] = path.read_text(encoding="utf-8")
    return files


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.folder)
def test_the_source_keeps_the_dependency_rule(rule):
    files = sources(rule.folder)
    assert files, f"no Python files under {rule.folder}: the rule checks nothing"
    breaches = [b for path, text in files.items() for b in rule.breaches(path, text)]
    heading = f"{rule.folder} must not import {' or '.join(rule.forbidden)} ({rule.why}):"
    assert not breaches, "\n".join([heading, *breaches])


#: per rule, a file it covers, a module it forbids, and (where there is one) a module that file
#: may import that sits close to the forbidden ones
SAMPLES = {
    "vl_prune/": ("vl_prune/lottery.py", "vl_prune_plugins.world", "vl_prune.world"),
    "plugins/": ("plugins/world/theta0.py", "vl_prune_cli.main", "vl_prune_plugins.tasks"),
    "plugins/backbones/": (
        "plugins/backbones/uniter.py",
        "vl_prune_plugins.tasks.annotations",
        "vl_prune_plugins.backbones.hf_checkpoint",
    ),
    "plugins/tasks/": (
        "plugins/tasks/nlvr2.py",
        "vl_prune_plugins.world.scenes",
        "vl_prune.data.inputs",
    ),
    "examples/": ("examples/x-plugin/x/backbone.py", "vl_prune_plugins.tasks", "vl_prune.world"),
    "tests/plugins/": ("tests/plugins/x/x/__init__.py", "vl_prune_cli", "vl_prune.task"),
}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.folder)
def test_each_rule_catches_an_import_hidden_in_a_function_or_type_checking_block(rule):
    path, forbidden, allowed = SAMPLES[rule.folder]
    source = (
        "from typing import TYPE_CHECKING\n"
        f"import {allowed}\n"
        "if TYPE_CHECKING:\n"
        f"    import {forbidden}\n"
        "def later():\n"
        f"    from {forbidden} import something\n"
    )
    assert rule.breaches(path, source) == [
        f"{path}:4 imports {forbidden}",
        f"{path}:6 imports {forbidden}",
    ]


def test_relative_imports_are_resolved_from_the_files_package():
    assert imports("from ..world import scenes\n", "vl_prune_plugins.tasks") == [
        (1, "vl_prune_plugins.world"),
        (1, "vl_prune_plugins.world.scenes"),
    ]
    assert imports("from . import world\n", "vl_prune_plugins") == [
        (1, "vl_prune_plugins"),
        (1, "vl_prune_plugins.world"),
    ]
    tasks = next(rule for rule in RULES if rule.folder == "plugins/tasks/")
    assert tasks.breaches("plugins/tasks/vqa.py", "from .. import world\n") == [
        "plugins/tasks/vqa.py:1 imports vl_prune_plugins.world"
    ]
    assert tasks.breaches("plugins/tasks/vqa.py", "from .inputs import encode\n") == []


def test_the_world_may_import_tasks():
    source = "from vl_prune_plugins.tasks.annotations import write_json\n"
    covering = [rule for rule in RULES if "plugins/world/splits/vqa.py".startswith(rule.folder)]
    assert covering
    assert all(rule.breaches("plugins/world/splits/vqa.py", source) == [] for rule in covering)


@pytest.mark.parametrize(
    "modules",
    [("vl_prune",), ("vl_prune.backbone", "vl_prune.task", "vl_prune.world", "vl_prune.registry")],
    ids=["vl_prune", "contracts"],
)
def test_importing_the_core_loads_no_heavy_dependency_and_no_plugin(modules):
    code = f"import json, sys, {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = {"transformers", "accelerate", "peft", "vl_prune_plugins", "vl_prune_cli"}
    loaded = [name for name in json.loads(done.stdout) if name.partition(".")[0] in heavy]
    assert not loaded, f"importing {', '.join(modules)} imported {', '.join(loaded)}"
