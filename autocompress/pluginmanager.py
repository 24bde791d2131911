"""Loads plugins from the ``autocompress`` entry-point group and owns the registries their registration hooks
fill: techniques, costs (what a budget limits) and metrics (what the search maximizes).

Builtin techniques are found exactly like third-party ones. A plugin can be blocked by name (``block=``, the CLI's
``--block-plugin NAME`` or the ``AUTOCOMPRESS_BLOCK_PLUGINS`` variable, comma-separated), third-party autoload can be
turned off (``AUTOCOMPRESS_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the distributions named in
``BUILTIN_DISTRIBUTIONS``), and a plugin that fails to import, implements a hook that does not exist (a misspelt
name), implements one with the wrong arguments, or raises while registering is reported by name
(:attr:`Plugins.errors`) without breaking the others.

Hooks other than registration and export preparation are notifications (``autocompress_trial_completed``): each
plugin's implementation is called on its own, so one that raises is reported by name (a :class:`PluginWarning`, kept
in :attr:`Plugins.hook_errors`) and the others still hear the event. An export preparation that raises fails the
export instead (a half-prepared model would be exported wrong).

As in pytest, a function named with the hook prefix (``autocompress_*``) is taken as a hook implementation even
without ``@hookimpl``, so a misspelt hook name is reported instead of silently never called.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from autocompress import builtins, hookspecs
from autocompress.cost_kinds import Cost, check_cost
from autocompress.metric import Metric
from autocompress.runtime import Runtime
from autocompress.technique import Stage, Technique

ENTRY_POINT_GROUP = "autocompress"
BLOCK_ENV = "AUTOCOMPRESS_BLOCK_PLUGINS"
NO_AUTOLOAD_ENV = "AUTOCOMPRESS_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTIONS = frozenset({"autocompress"})
HOOK_PREFIX = "autocompress_"
IN_CODE = "(registered in code)"
#: hooks whose failure must stop the caller (not notifications): called through their own per-plugin guard
CALLED_FOR_RESULTS = frozenset({"autocompress_register_techniques", "autocompress_register_costs",
                                "autocompress_register_metrics", "autocompress_register_runtimes",
                                "autocompress_register_backends", "autocompress_prepare_export"})
#: the builtin search backends ("module:Class", imported only when chosen: see search/backend.py), owned by
#: BUILTIN_OWNER; a plugin's backend of the same name is refused like a technique registered twice
BUILTIN_BACKENDS = {"optuna": "autocompress.search.optuna_backend:OptunaBackend",
                    "ray": "autocompress.search.ray_backend:RayBackend"}
BUILTIN_OWNER = "autocompress"


class PluginWarning(UserWarning):
    """A plugin misbehaved in a hook; autocompress went on without it."""


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    distribution: str
    version: str
    techniques: tuple[str, ...] = ()
    error: str | None = None  # why it failed to load, if it did (one line)
    skipped: str | None = None  # why it was not loaded on purpose: "blocked", "autoload disabled"
    costs: tuple[str, ...] = ()  # names of the costs it registered
    metrics: tuple[str, ...] = ()  # names of the metrics it registered
    runtimes: tuple[str, ...] = ()  # names of the runtimes it registered
    backends: tuple[str, ...] = ()  # search backends it registered

    @property
    def status(self) -> str:
        if self.error:
            return f"ERROR {self.error}"
        return self.skipped or "ok"


@dataclass
class Plugins:
    """The loaded plugins and what they registered: techniques, costs, metrics, runtimes and search backends (the
    core's own under the plugin name ``autocompress``, see autocompress/builtins.py)."""

    manager: pluggy.PluginManager
    techniques: dict[str, Technique] = field(default_factory=dict)
    info: list[PluginInfo] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # technique name -> plugin name
    costs: dict[str, Cost] = field(default_factory=dict)  # by name; a budget finds them by name or column
    cost_owners: dict[str, str] = field(default_factory=dict)  # cost name -> plugin name
    metrics: dict[str, Metric] = field(default_factory=dict)
    metric_owners: dict[str, str] = field(default_factory=dict)  # metric name -> plugin name
    #: where models run and are timed (autocompress/runtime.py): torch eager is the core's, others come from plugins
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    runtime_owners: dict[str, str] = field(default_factory=dict)  # runtime name -> plugin name
    #: backend name -> a search backend (search/backend.py), or a builtin's "module:Class"
    backends: dict[str, object] = field(default_factory=lambda: dict(BUILTIN_BACKENDS))
    backend_owners: dict[str, str] = field(default_factory=lambda: dict.fromkeys(BUILTIN_BACKENDS, BUILTIN_OWNER))
    hook_errors: list[str] = field(default_factory=list)  # "plugin 'x' failed in autocompress_...: ..."

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.info if p.error]

    @property
    def skipped(self) -> list[PluginInfo]:
        return [p for p in self.info if p.skipped]

    def ordered(self, names: Iterable[str] | None = None) -> list[Technique]:
        """Techniques in the order they must be applied: by stage, then name."""
        chosen = self.techniques.values() if names is None else [self.techniques[n] for n in names]
        return sorted(chosen, key=lambda t: (int(t.stage), t.name))


class _PluginManager(pluggy.PluginManager):
    """Takes undecorated ``autocompress_*`` functions as hook implementations too (see the module docstring)."""

    def parse_hookimpl_opts(self, plugin: object, name: str):  # type: ignore[override]
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith(HOOK_PREFIX):
            attr = inspect.getattr_static(plugin, name, None)
            if isinstance(attr, (types.FunctionType, types.MethodType, staticmethod, classmethod)):
                return {}
        return opts


def _blocked_from_env() -> set[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def autoload_enabled() -> bool:
    """False when ``AUTOCOMPRESS_DISABLE_PLUGIN_AUTOLOAD`` is set to anything but an empty/false value."""
    return os.environ.get(NO_AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def load_plugins(block: Iterable[str] = (), autoload: bool | None = None, extra: Iterable[object] = ()) -> Plugins:
    """Build the plugin manager, load entry points, collect techniques.

    ``extra`` are plugin objects registered directly (tests, notebooks); they go through the same hooks.
    """
    blocked = set(block) | _blocked_from_env()
    if autoload is None:
        autoload = autoload_enabled()
    pm = _PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtins, name=builtins.PLUGIN_NAME)  # the core's costs and metric; first, so they keep their names
    # (name, distribution, version, plugin object or None, error, skipped)
    infos: list[list] = []
    providers: dict[str, str] = {}  # plugin name -> distribution that provides it

    for ep in _entry_points():
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            infos.append([ep.name, dist, version, None, None, "blocked"])
            continue
        if not autoload and dist not in BUILTIN_DISTRIBUTIONS:
            infos.append([ep.name, dist, version, None, None, "autoload disabled"])
            continue
        if ep.name in providers:
            infos.append([ep.name, dist, version, None,
                          f"plugin name {ep.name!r} is already provided by distribution {providers[ep.name]!r}", None])
            continue
        providers[ep.name] = dist
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            infos.append([ep.name, dist, version, None, f"failed to load: {_one_line(exc)}", None])
            continue
        infos.append([ep.name, dist, version, plugin, None, None])

    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        if name in blocked:
            infos.append([name, IN_CODE, "", None, None, "blocked"])
            continue
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            infos.append([name, IN_CODE, "", None, f"failed to load: {_one_line(exc)}", None])
            continue
        infos.append([name, IN_CODE, "", plugin, None, None])

    _drop_invalid(pm, infos)

    registry = Plugins(manager=pm)
    impls: dict[str, dict[str, pluggy.HookImpl]] = {}  # plugin name -> registration hook -> its implementation
    for hook in REGISTRATIONS:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            impls.setdefault(impl.plugin_name, {})[hook] = impl
    error = _register(impls.pop(builtins.PLUGIN_NAME, {}), registry, {})
    if error is not None:
        raise RuntimeError(f"the builtin costs and metrics could not be registered: {error}")
    for name, dist, version, _plugin, error, skipped in infos:
        registered: dict[str, list[str]] = {}
        if error is None and skipped is None and name in impls:
            error = _register(impls[name], registry, registered)
            if error is not None:  # half a plugin is worse than none: its other hooks go too
                pm.unregister(name=name)
        registry.info.append(PluginInfo(name, dist, version, tuple(registered.get("techniques", ())), error, skipped,
                                        costs=tuple(registered.get("costs", ())),
                                        metrics=tuple(registered.get("metrics", ())),
                                        runtimes=tuple(registered.get("runtimes", ())),
                                        backends=tuple(registered.get("backends", ()))))
    _isolate_notifications(pm, registry)
    return registry


def _isolate_notifications(pm: pluggy.PluginManager, registry: Plugins) -> None:
    """Wrap every implementation of a notification hook so its exception is reported by plugin name instead of
    stopping pluggy's loop (which would hide the event from the plugins after it)."""
    for hook_name in pm.hook.__dict__:
        if not hook_name.startswith(HOOK_PREFIX) or hook_name in CALLED_FOR_RESULTS:
            continue
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if not (impl.hookwrapper or impl.wrapper):
                impl.function = _guarded(impl.function, impl.plugin_name, hook_name, registry)


def _guarded(function, plugin: str, hook: str, registry: Plugins):
    @functools.wraps(function)
    def call(*args):
        try:
            return function(*args)
        except Exception as exc:  # a listener's bug must not silence the other listeners nor fail a trial
            message = f"plugin {plugin!r} failed in {hook}: {_one_line(exc)}"
            registry.hook_errors.append(message)
            warnings.warn(message, PluginWarning, stacklevel=2)
            return None

    return call


def _drop_invalid(pm: pluggy.PluginManager, infos: list[list]) -> None:
    """Unregister every plugin that implements a hook no spec declares (a misspelt name), recording why."""
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            bad = exc.plugin
            if bad is None or not pm.is_registered(bad):
                raise
            pm.unregister(bad)
            for row in infos:
                if row[3] is bad:
                    row[3], row[4] = None, f"invalid hook: {_one_line(exc)}"


def _check_technique(technique: Any, registry: "Plugins") -> None:
    if not isinstance(technique, Technique):
        raise TypeError(f"register() takes a Technique, got {type(technique).__name__}")
    if not isinstance(getattr(technique, "stage", None), Stage):
        raise TypeError(f"technique {technique.name!r} has no valid stage")
    _check_free("technique", technique.name, registry.techniques, registry.owners)


def _check_cost(cost: Any, registry: "Plugins") -> None:
    check_cost(cost)
    # a name or column is a budget word either way (latency=0.5x, latency_ms=12): neither may be taken by another
    words = {w: c.name for c in registry.costs.values() for w in (c.name, c.column)}
    for word in dict.fromkeys((cost.name, cost.column)):
        if word in words:
            owner = registry.cost_owners[words[word]]
            raise ValueError(f"cost {word!r} is already registered by plugin {owner!r}")


def _check_metric(metric: Any, registry: "Plugins") -> None:
    if not isinstance(metric, Metric) or not callable(metric.fn):
        raise TypeError(f"register() takes a Metric, got {type(metric).__name__}")
    _check_free("metric", metric.name, registry.metrics, registry.metric_owners)


def _check_runtime(runtime: Any, registry: "Plugins") -> None:
    if not isinstance(runtime, Runtime):
        raise TypeError(f"register() takes an autocompress.runtime.Runtime, got {type(runtime).__name__}")
    if not runtime.name:
        raise ValueError(f"runtime {type(runtime).__name__} has no name")
    _check_free("runtime", runtime.name, registry.runtimes, registry.runtime_owners)


def _check_backend(backend: Any, registry: "Plugins") -> None:
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name or not callable(getattr(backend, "run", None)):
        raise TypeError(f"register() takes a search backend (a name and a run method), got {type(backend).__name__}")
    _check_free("backend", name, registry.backends, registry.backend_owners)


def _check_free(noun: str, name: str, taken: dict, owners: dict[str, str]) -> None:
    if name in taken:
        raise ValueError(f"{noun} {name!r} is already registered by plugin {owners[name]!r}")


@dataclass(frozen=True)
class _Registration:
    """One registration hook: where what it registers is kept in :class:`Plugins`, and how it is checked."""

    items: str  # the Plugins attribute, name -> object
    owners: str  # the Plugins attribute, name -> plugin name
    check: Callable[[Any, "Plugins"], None]  # raises TypeError/ValueError for an object that cannot be registered


REGISTRATIONS = {
    "autocompress_register_techniques": _Registration("techniques", "owners", _check_technique),
    "autocompress_register_costs": _Registration("costs", "cost_owners", _check_cost),
    "autocompress_register_metrics": _Registration("metrics", "metric_owners", _check_metric),
    "autocompress_register_runtimes": _Registration("runtimes", "runtime_owners", _check_runtime),
    "autocompress_register_backends": _Registration("backends", "backend_owners", _check_backend),
}


def _register(impls: dict[str, pluggy.HookImpl], registry: Plugins, registered: dict[str, list[str]]) -> str | None:
    """Call one plugin's registration hooks, so a failure is attributed to that plugin alone; ``registered`` gets
    the names it registered, per Plugins attribute. On failure everything it registered is taken back."""
    try:
        for hook, impl in impls.items():
            kind = REGISTRATIONS[hook]
            items, owners = getattr(registry, kind.items), getattr(registry, kind.owners)

            def register(obj: Any, kind: _Registration = kind, items: dict = items, owners: dict = owners,
                         plugin: str = impl.plugin_name) -> None:
                kind.check(obj, registry)
                items[obj.name] = obj
                owners[obj.name] = plugin
                registered.setdefault(kind.items, []).append(obj.name)

            impl.function(**{arg: register for arg in impl.argnames})
    except Exception as exc:
        for attr, names in registered.items():
            kind = next(k for k in REGISTRATIONS.values() if k.items == attr)
            for name in names:
                getattr(registry, kind.items).pop(name, None)
                getattr(registry, kind.owners).pop(name, None)
        registered.clear()
        return f"failed to register: {_one_line(exc)}"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
