"""Loads technique plugins from the ``autocompress`` entry-point group and owns the technique registry.

Builtin techniques are found exactly like third-party ones. A plugin can be blocked by name (``block=`` or the
``AUTOCOMPRESS_BLOCK_PLUGINS`` variable, comma-separated), third-party autoload can be turned off
(``AUTOCOMPRESS_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the distributions named in ``BUILTIN_DISTRIBUTIONS``), and a
plugin that fails to import or register is reported by name without breaking the others.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Iterable

import pluggy

from autocompress import hookspecs
from autocompress.technique import Stage, Technique

ENTRY_POINT_GROUP = "autocompress"
BLOCK_ENV = "AUTOCOMPRESS_BLOCK_PLUGINS"
NO_AUTOLOAD_ENV = "AUTOCOMPRESS_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTIONS = frozenset({"autocompress"})


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    distribution: str
    version: str
    techniques: tuple[str, ...] = ()
    error: str | None = None  # why it failed to load, if it did


@dataclass
class Plugins:
    """The loaded plugins and the techniques they registered."""

    manager: pluggy.PluginManager
    techniques: dict[str, Technique] = field(default_factory=dict)
    info: list[PluginInfo] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # technique name -> plugin name

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.info if p.error]

    def ordered(self, names: Iterable[str] | None = None) -> list[Technique]:
        """Techniques in the order they must be applied: by stage, then name."""
        chosen = self.techniques.values() if names is None else [self.techniques[n] for n in names]
        return sorted(chosen, key=lambda t: (int(t.stage), t.name))


def _blocked_from_env() -> set[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_plugins(block: Iterable[str] = (), autoload: bool | None = None, extra: Iterable[object] = ()) -> Plugins:
    """Build the plugin manager, load entry points, collect techniques.

    ``extra`` are plugin objects registered directly (tests, notebooks); they go through the same hooks.
    """
    blocked = set(block) | _blocked_from_env()
    if autoload is None:
        autoload = os.environ.get(NO_AUTOLOAD_ENV, "") in ("", "0", "false", "no")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[tuple[str, str, str, object | None, str | None]] = []

    for ep in _entry_points():
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            continue
        if not autoload and dist not in BUILTIN_DISTRIBUTIONS:
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            infos.append((ep.name, dist, version, None, f"failed to load: {type(exc).__name__}: {exc}"))
            continue
        infos.append((ep.name, dist, version, plugin, None))

    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        if name in blocked:
            continue
        pm.register(plugin, name=name)
        infos.append((name, "(registered in code)", "", plugin, None))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        bad = exc.plugin
        name = pm.get_name(bad) if bad is not None else "?"
        pm.unregister(bad)
        infos = [(n, d, v, p, f"invalid hook: {exc}") if p is bad else (n, d, v, p, e) for n, d, v, p, e in infos]

    registry = Plugins(manager=pm)
    impls = {impl.plugin_name: impl for impl in pm.hook.autocompress_register_techniques.get_hookimpls()}
    for name, dist, version, plugin, error in infos:
        registered: list[str] = []
        if error is None and name in impls:
            error = _register_techniques(impls[name], registry, registered)
        registry.info.append(PluginInfo(name, dist, version, tuple(registered), error))
    return registry


def _register_techniques(impl: pluggy.HookImpl, registry: Plugins, registered: list[str]) -> str | None:
    """Call one plugin's register hook, so a failure is attributed to that plugin alone."""

    def register(technique: Technique) -> None:
        if not isinstance(technique, Technique):
            raise TypeError(f"register() takes a Technique, got {type(technique).__name__}")
        if not isinstance(getattr(technique, "stage", None), Stage):
            raise TypeError(f"technique {technique.name!r} has no valid stage")
        if technique.name in registry.techniques:
            owner = registry.owners[technique.name]
            raise ValueError(f"technique {technique.name!r} is already registered by plugin {owner!r}")
        registry.techniques[technique.name] = technique
        registry.owners[technique.name] = impl.plugin_name
        registered.append(technique.name)

    try:
        impl.function(**{arg: register for arg in impl.argnames})
    except Exception as exc:
        for tech in registered:
            registry.techniques.pop(tech, None)
            registry.owners.pop(tech, None)
        registered.clear()
        return f"failed to register: {type(exc).__name__}: {exc}"
    return None


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
