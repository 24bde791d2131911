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

    from autocompress.export import ExportPlan
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
