"""Plugin contract checks: a backbone, task or method is checked when first used, in one line.

A plugin that breaks its contract would otherwise fail deep inside a run, after data, θ0 and a
run folder were built; here it fails before any of them with one line naming the plugin, its
distribution and the fault (`vlprune check-plugin NAME` runs the same check for authors).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune import registry
from vl_prune.backbone import Backbone, VLBatch, VLOutput
from vl_prune.errors import VLPruneError
from vl_prune.pruning.aliases import MethodAlias
from vl_prune.task import Task
from vl_prune.train import TrainSettings
from vl_prune.world import embedded_world

#: the kinds with a contract; other kinds (worlds, world splits) are checked where they are used
CHECKED = ("backbones", "tasks", "methods")
IMAGE_INPUTS = ("regions", "pixels")
#: how vl_prune 0.1's methods told the driver to run their rounds, now lottery settings
ROUND_SETTINGS = ("rewind", "one_shot", "adversarial")
#: the task methods every task implements itself (the base class's only raise)
TASK_METHODS = ("examples", "head", "collate", "loss", "predict", "score")
#: the probe batch: two examples of this many tokens and (for region backbones) regions
EXAMPLES, TOKENS, REGIONS = 2, 6, 3
#: seeds the throwaway tiny build and the probe batch, so a check is the same every time
SEED = 0


class ContractError(VLPruneError):
    """A plugin loads but does not do what its kind's contract says."""


@cache
def load_checked(kind: str, name: str) -> Any:
    """registry.find(kind, name) → load → the kind's check, once per (kind, name) in a process;
    returns the loaded object. Kinds without a contract here are loaded unchecked."""
    plugin = registry.find(kind, name)
    loaded = plugin.load()
    check = {"backbones": check_backbone, "tasks": check_task, "methods": check_method}.get(kind)
    if check is not None:
        check(loaded, plugin)
    return loaded


def locate(name: str, kind: str | None = None) -> registry.Plugin:
    """The checked plugin called `name`, of `kind` or else of whichever checked kind has it: an
    error if several kinds do, and the registry's close-match error if none does."""
    if kind is not None:
        return registry.find(kind, name)
    found = {p.kind for k in CHECKED for p in registry.plugins(k) if p.name == name}
    if len(found) > 1:
        kinds = " or ".join(f"--kind {k}" for k in CHECKED if k in found)
        raise VLPruneError(f"{name!r} names plugins of several kinds: pass {kinds}")
    if found:
        return registry.find(found.pop(), name)
    names = sorted({p.name for k in CHECKED for p in registry.plugins(k)})
    raise VLPruneError(
        f"unknown plugin {name!r}{registry.did_you_mean(name, names)} (`vlprune list` shows the "
        "backbones, tasks and methods)"
    )


def check_backbone(backbone_class: Any, plugin: registry.Plugin) -> None:
    """A Backbone subclass with presets and an image input; if it has a `tiny` preset, a
    throwaway tiny build must carry the documented attributes, list prunable weights of its
    own and encode a two-example batch of its image kind into VLOutput's documented shapes."""
    _check_class(backbone_class, Backbone, plugin)
    presets = getattr(backbone_class, "presets", None)
    if not (isinstance(presets, tuple) and presets and all(isinstance(p, str) for p in presets)):
        _fail(plugin, f"presets is {presets!r}, not a non-empty tuple of names")
    image_input = getattr(backbone_class, "image_input", None)
    if image_input not in IMAGE_INPUTS:
        _fail(plugin, f"image_input is {image_input!r}, not 'regions' or 'pixels'")
    # Only `tiny` is cheap enough to build on every first use; other presets are checkpoints.
    if "tiny" not in presets:
        return
    where = f"{backbone_class.__name__}.build('tiny')"
    with _own_random_streams(), torch.no_grad():
        backbone = _call(plugin, where, backbone_class.build, "tiny")
        if not isinstance(backbone, Backbone):
            _fail(plugin, f"{where} returned {_a(backbone)}, not a vl_prune.backbone.Backbone")
        backbone.eval()
        hidden = _check_attributes(backbone, image_input, where, plugin)
        _check_prunable(backbone, where, plugin)
        batch = _probe_batch(backbone)
        output = _call(plugin, f"{type(backbone).__name__}.forward", backbone, batch)
    _check_output(output, batch.input_ids.shape[1], hidden, plugin)


def check_task(task_class: Any, plugin: registry.Plugin) -> None:
    """A Task subclass with a metric, image inputs, two splits and a recipe of training
    settings, implementing what the base class leaves open. Nothing is read: that needs data."""
    _check_class(task_class, Task, plugin)
    metric = getattr(task_class, "metric", None)
    if not (isinstance(metric, str) and metric):
        _fail(plugin, f"metric is {metric!r}, not the name of its primary score")
    inputs = getattr(task_class, "image_inputs", None)
    if not (isinstance(inputs, tuple) and inputs and set(inputs) <= set(IMAGE_INPUTS)):
        _fail(plugin, f"image_inputs is {inputs!r}, not a tuple of 'regions' and/or 'pixels'")
    splits = getattr(task_class, "splits", None)
    if not (
        isinstance(splits, tuple) and len(splits) >= 2 and all(isinstance(s, str) for s in splits)
    ):
        _fail(plugin, f"splits is {splits!r}, not a tuple of two or more names (train, eval)")
    recipe = getattr(task_class, "recipe", None)
    if not isinstance(recipe, Mapping):
        _fail(plugin, f"recipe is {_a(recipe)}, not a dict of TrainSettings fields")
    if unknown := TrainSettings.unknown(recipe):
        _fail(plugin, f"recipe has {', '.join(map(repr, unknown))}, not TrainSettings fields")
    if missing := [m for m in TASK_METHODS if getattr(task_class, m, None) is getattr(Task, m)]:
        _fail(plugin, f"{task_class.__name__} does not implement {', '.join(missing)}")


def check_method(method: Any, plugin: registry.Plugin) -> None:
    """A torch BasePruningMethod subclass, or a `MethodAlias` of an installed one (a mask rule
    with lottery settings); whether rounds can use it is checked where they run. A method that
    still says how rounds run (the class attributes of vl_prune 0.1's methods) is refused: it
    would silently run as plain IMP."""
    if isinstance(method, MethodAlias):
        if not any(p.name == method.method for p in registry.plugins("methods")):
            _fail(plugin, f"it stands for method {method.method!r}, which is not installed")
        rule = registry.find("methods", method.method).load()
        if isinstance(rule, MethodAlias):
            _fail(plugin, f"it stands for {method.method!r}, another alias, not a mask rule")
        _check_class(rule, prune.BasePruningMethod, plugin)
        return
    _check_class(method, prune.BasePruningMethod, plugin)
    if steering := [name for name in ROUND_SETTINGS if getattr(method, name, False) is True]:
        _fail(
            plugin,
            f"{method.__name__} sets {steering[0]}, which no longer steers rounds: register a "
            "vl_prune.pruning.MethodAlias for it (or pass --rewind-step, --one-shot, "
            "--adversarial)",
        )


def _probe_batch(backbone: Backbone) -> VLBatch:
    """Two examples of the backbone's image kind: random words below its vocabulary size
    (never 0, the padding id of BERT's and the world's vocabularies), valid boxes, or images of
    the world's size; all unmasked."""
    generator = torch.Generator().manual_seed(SEED)
    words = _vocabulary(backbone)
    tokens = min(TOKENS, backbone.max_positions or TOKENS)
    ids = torch.randint(1, words, (EXAMPLES, tokens), generator=generator)
    batch = VLBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
    )
    if backbone.image_input == "regions":
        corner = torch.rand(EXAMPLES, REGIONS, 2, generator=generator) * 0.5
        size = 0.1 + torch.rand(EXAMPLES, REGIONS, 2, generator=generator) * 0.4
        batch.region_feats = torch.randn(EXAMPLES, REGIONS, backbone.img_dim, generator=generator)
        batch.region_boxes = torch.cat([corner, corner + size, size], dim=-1)
        batch.region_mask = torch.ones(EXAMPLES, REGIONS, dtype=torch.long)
    else:
        side = embedded_world().image_size
        batch.pixel_values = torch.randn(EXAMPLES, 3, side, side, generator=generator)
        batch.pixel_mask = torch.ones(EXAMPLES, side, side, dtype=torch.long)
    return batch


def _vocabulary(backbone: Backbone) -> int:
    # vocab_size may be None (a backbone that cannot say); a tiny preset reads the world's words.
    if backbone.vocab_size is not None:
        return backbone.vocab_size
    return embedded_world().vocab_size


@contextmanager
def _own_random_streams() -> Iterator[None]:
    """Build and encode from SEED, then give the caller back its random streams untouched, so a
    run is bit-identical with or without the check. CUDA's are left alone: the check runs on
    the CPU, and forking them would initialise CUDA before a launcher may want it."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # Seeds only the CPU generator: torch.manual_seed would also queue a CUDA seed.
        torch.random.default_generator.manual_seed(SEED)
        random.seed(SEED)
        np.random.seed(SEED)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _check_attributes(
    backbone: Backbone, image_input: str, where: str, plugin: registry.Plugin
) -> int:
    """The attributes the rest of vl_prune reads of a built backbone; returns hidden_size."""
    sizes = ("hidden_size", "img_dim") if image_input == "regions" else ("hidden_size",)
    if missing := [name for name in ("preset", *sizes) if not hasattr(backbone, name)]:
        _fail(plugin, f"{where} has no attribute {', '.join(missing)}")
    if backbone.preset != "tiny":
        _fail(plugin, f"{where} has preset {backbone.preset!r}, not 'tiny'")
    for name in sizes:
        if not _positive_int(getattr(backbone, name)):
            _fail(plugin, f"{where} has {name} {getattr(backbone, name)!r}, not a positive int")
    for name in ("vocab_size", "max_positions"):
        value = getattr(backbone, name, None)
        if value is not None and not _positive_int(value):
            _fail(plugin, f"{where} has {name} {value!r}, not a positive int or None")
    return backbone.hidden_size


def _check_prunable(backbone: Backbone, where: str, plugin: registry.Plugin) -> None:
    pairs = _call(plugin, f"{where}.prunable()", backbone.prunable)
    if not isinstance(pairs, list) or not pairs:
        _fail(plugin, f"{where}.prunable() is {_a(pairs)}, not a non-empty list of pairs")
    own = {id(module) for module in backbone.modules()}
    seen = set()
    for pair in pairs:
        module, name = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
        if not isinstance(module, nn.Module) or not isinstance(name, str):
            _fail(plugin, f"{where}.prunable() lists {pair!r}, not a (module, 'weight') pair")
        what = f"{where}.prunable() lists ({type(module).__name__}, {name!r})"
        if id(module) not in own:
            _fail(plugin, f"{what}, a module outside the backbone")
        if not isinstance(module._parameters.get(name), nn.Parameter):
            _fail(plugin, f"{what}, which is no parameter of that module")
        if (id(module), name) in seen:
            _fail(plugin, f"{what} twice")
        seen.add((id(module), name))


def _check_output(output: Any, tokens: int, hidden: int, plugin: registry.Plugin) -> None:
    if not isinstance(output, VLOutput):
        _fail(plugin, f"forward returned {_a(output)}, not a vl_prune.backbone.VLOutput")
    expected = {
        "text_states": ((EXAMPLES, tokens, hidden), "batch × tokens × hidden_size"),
        "image_states": ((EXAMPLES, None, hidden), "batch × regions or patches × hidden_size"),
        "pooled": ((EXAMPLES, hidden), "hidden_size"),
    }
    for name, (shape, meaning) in expected.items():
        value = getattr(output, name)
        if not isinstance(value, torch.Tensor):
            _fail(plugin, f"{name} is {_a(value)}, not a tensor")
        fits = value.dim() == len(shape) and all(
            (want is None and got >= 1) or got == want
            for got, want in zip(value.shape, shape, strict=True)
        )
        if not fits:
            wanted = " × ".join("N" if size is None else str(size) for size in shape)
            _fail(plugin, f"{name} is {_shape(value)}, not {wanted} ({meaning})")


def _check_class(obj: Any, base: type, plugin: registry.Plugin) -> None:
    expected = f"{base.__module__}.{base.__qualname__}"
    if not isinstance(obj, type):
        _fail(plugin, f"{plugin.target} is {_a(obj)}, not a {expected} subclass")
    if not issubclass(obj, base):
        _fail(plugin, f"{plugin.target} is a class that does not subclass {expected}")


def _call(plugin: registry.Plugin, where: str, function, *args) -> Any:
    """`function(*args)`; any exception it raises is the plugin's fault, named as such."""
    try:
        return function(*args)
    except Exception as exc:
        raise _error(plugin, f"{where} raised {type(exc).__name__}: {exc}") from exc


def _fail(plugin: registry.Plugin, what: str) -> NoReturn:
    raise _error(plugin, what)


def _error(plugin: registry.Plugin, what: str) -> ContractError:
    text = " ".join(what.split())  # one line, whatever the plugin's own message holds
    return ContractError(
        f"{plugin.kind[:-1]} plugin {plugin.name!r} (from {plugin.distribution}) breaks the "
        f"contract: {text}"
    )


def _a(obj: Any) -> str:
    """What an object is, as an error names it: 'a function', 'a class', 'a tuple'."""
    if isinstance(obj, type):
        return "a class"
    kind = type(obj).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def _shape(tensor: torch.Tensor) -> str:
    return " × ".join(map(str, tensor.shape)) or "a scalar"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
