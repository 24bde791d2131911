"""Every hook an autocompress plugin can implement.

A plugin is a module (or object) registered through the ``autocompress`` entry-point group, the same group the
builtin techniques use. It implements any of the hooks below with ``@autocompress.hookimpl``. The core owns the
registries the hooks fill, so duplicate names and error messages are handled in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from autocompress.cost_kinds import Cost
    from autocompress.export import ExportPlan
    from autocompress.metric import Metric
    from autocompress.runtime import Runtime
    from autocompress.search.backend import Backend
    from autocompress.technique import Technique

PROJECT = "autocompress"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration (called once, when the plugin manager is built) -------------------------------------------------


@hookspec
def autocompress_register_techniques(register: Callable[["Technique"], None]) -> None:
    """Register compression techniques by calling ``register(technique)`` once per technique.

    A technique is an instance of :class:`autocompress.technique.Technique`. Names must be unique across all
    plugins; registering a name twice raises an error naming both plugins.
    """


@hookspec
def autocompress_register_runtimes(register: Callable[["Runtime"], None]) -> None:
    """Register runtimes (where a model runs and is timed) by calling ``register(runtime)`` once per runtime.

    A runtime is an instance of :class:`autocompress.runtime.Runtime`: a ``name`` (what ``target.runtime`` in a
    config says), the modules it needs (a missing one is a one-line error when the runtime is asked for) and
    ``prepare(model, example, threads, plugins)``, which returns a callable running one forward pass of ``example``
    in the runtime. A search then times every candidate through it, paired with the uncompressed model prepared the
    same way. ``torch`` (eager) is the core's; names must be unique across all plugins.
    """


@hookspec
def autocompress_register_costs(register: Callable[["Cost"], None]) -> None:
    """Register costs a budget can limit by calling ``register(cost)`` once per cost.

    A cost is an :class:`autocompress.cost_kinds.Cost`: its ``name`` (the budget word of a relative limit,
    ``params=0.5x``), its ``column`` (the trial record's column and the word of an absolute limit), its unit and
    ``measure(model, run)``, its value on a compressed model. Latency and memory are registered this way by the core.
    Names and columns must be unique across all plugins; a taken one raises an error naming both plugins.
    """


@hookspec
def autocompress_register_metrics(register: Callable[["Metric"], None]) -> None:
    """Register validation metrics by calling ``register(metric)`` once per metric.

    A metric is an :class:`autocompress.metric.Metric` (``name``, ``fn(model, split) -> float``, higher is better);
    a run chooses one by name with ``search.metric`` (default ``accuracy``, registered by the core). Names must be
    unique across all plugins; a taken one raises an error naming both plugins.
    """


@hookspec
def autocompress_register_backends(register: Callable[["Backend"], None]) -> None:
    """Register search backends by calling ``register(backend)`` once per backend.

    A backend (:class:`autocompress.search.backend.Backend`) decides where a search's trials are evaluated: it asks
    the run's study for trials, evaluates them and tells the study their records. It is chosen by its ``name``
    (``search.backend``, ``--backend``). Names must be unique across all plugins and the builtin backends
    (``optuna``, ``ray``); registering a name twice raises an error naming both plugins.
    """


# --- search lifecycle ---------------------------------------------------------------------------------------------


@hookspec
def autocompress_trial_completed(record: dict) -> None:
    """Called after each trial of a search with the row that goes into ``trials.csv``.

    ``record`` is :meth:`autocompress.record.TrialRecord.to_dict` (``number``, ``state``, ``feasible``,
    ``val_accuracy``, ``latency_ms``, ``memory_mb``, ``origin``, ``error``, ...: every field of the record, whichever
    backend ran the trial) plus the chosen settings. Use it for logging or external tracking; the return value is
    ignored and an exception here is reported but does not fail the trial.
    """


# --- export (called once per export, on a copy of the compressed model) -------------------------------------------


@hookspec
def autocompress_prepare_export(model: "nn.Module", plan: "ExportPlan") -> None:
    """Make the modules your technique put into ``model`` exportable to ``plan.target`` (``"onnx"`` or
    ``"openvino"``), and say what the exported file must hold.

    ``model`` is a copy of the compressed model; change it in place. Replace a module the exporter cannot trace
    (a custom kernel such as ``torch.ops.quantized``) by plain torch modules that compute the same. Call
    ``plan.int8(name)`` for each ``nn.Linear`` (by module name in ``model``) that must be int8 in the file, and
    ``plan.refuse(name, reason)`` for a setting that has no export path (the export stops with ``name: reason``,
    writing nothing). Modules that are plain torch already (pruned or factorized Linears) need nothing. Every
    plugin's implementation is called; one that raises fails the export, naming the plugin.
    """
