"""Plugin discovery through entry points: lazy, with close-match errors and isolated failures.

Backbones, tasks, pruning methods, worlds and the worlds' task splits are entry points in the
groups ``vl_prune.backbones``, ``vl_prune.tasks``, ``vl_prune.methods``, ``vl_prune.worlds``
and ``vl_prune.world_splits``. The built-ins are registered in vl_prune's own
pyproject.toml exactly like a third party's, so there is one way in. Nothing is imported until
a plugin is asked for by name or a listing is requested.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from vl_prune.errors import VLPruneError

KINDS = ("backbones", "tasks", "methods", "worlds", "world_splits")


class PluginLoadError(VLPruneError):
    """A plugin was found but importing it failed."""


@dataclass(frozen=True)
class Plugin:
    """One registered entry: its kind, the name users type, where it lives and who provides it."""

    kind: str
    name: str
    target: str
    distribution: str

    def load(self) -> Any:
        try:
            return _entry_point(self).load()
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind[:-1]} plugin {self.name!r} (from {self.distribution}) failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


@dataclass(frozen=True)
class Listing:
    """What `vlprune list` shows for a plugin: a one-line description, or why it failed to load."""

    plugin: Plugin
    description: str = ""
    error: str | None = None
    loaded: Any = None


def _group(kind: str) -> str:
    if kind not in KINDS:
        raise VLPruneError(f"unknown plugin kind {kind!r}; choose from {', '.join(KINDS)}")
    return f"vl_prune.{kind}"


def _entry_point(plugin: Plugin) -> EntryPoint:
    return EntryPoint(name=plugin.name, value=plugin.target, group=_group(plugin.kind))


def plugins(kind: str) -> list[Plugin]:
    """Every registered plugin of one kind, sorted by name, without importing any of them."""
    found = {}
    for ep in entry_points(group=_group(kind)):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        # The same distribution can be visible twice (e.g. an editable install beside a build dir).
        found.setdefault((ep.name, ep.value, dist), Plugin(kind, ep.name, ep.value, dist))
    return sorted(found.values(), key=lambda p: (p.name, p.distribution))


def find(kind: str, name: str) -> Plugin:
    """The plugin registered as `name`; a clear error with close matches if there is none."""
    candidates = plugins(kind)
    matches = [p for p in candidates if p.name == name]
    if len(matches) > 1:
        sources = ", ".join(f"{p.target} ({p.distribution})" for p in matches)
        raise VLPruneError(f"{kind[:-1]} {name!r} is registered more than once: {sources}")
    if not matches:
        names = [p.name for p in candidates]
        known = ", ".join(names) or "none installed"
        raise VLPruneError(
            f"unknown {kind[:-1]} {name!r}{did_you_mean(name, names)} (known: {known})"
        )
    return matches[0]


def did_you_mean(name: str, names: list[str]) -> str:
    """The hint after an unknown name: `; did you mean 'a' or 'b'?` for the closest of `names`,
    or nothing."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def load(kind: str, name: str) -> Any:
    """Import and return the object registered as `name` under `kind`."""
    return find(kind, name).load()


def describe(obj: Any) -> str:
    """One line about a plugin: its `description` attribute, else its docstring's first line."""
    text = getattr(obj, "description", None) or (getattr(obj, "__doc__", None) or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def listing(kind: str) -> list[Listing]:
    """Load every plugin of one kind for display; one that fails is reported, not raised."""
    rows = []
    for plugin in plugins(kind):
        try:
            loaded = plugin.load()
            rows.append(Listing(plugin, describe(loaded), loaded=loaded))
        except PluginLoadError as exc:
            cause = exc.__cause__
            rows.append(Listing(plugin, error=f"{type(cause).__name__}: {cause}"))
    return rows
