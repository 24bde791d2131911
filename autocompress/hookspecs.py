"""Every hook an autocompress plugin can implement.

A plugin is a module (or object) registered through the ``autocompress`` entry-point group, the same group the
builtin techniques use. It implements any of the hooks below with ``@autocompress.hookimpl``. The core owns the
registries the hooks fill, so duplicate names and error messages are handled in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
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


# --- search lifecycle ---------------------------------------------------------------------------------------------


@hookspec
def autocompress_trial_completed(record: dict) -> None:
    """Called after each trial of a search with the row that goes into ``trials.csv``.

    ``record`` holds ``number``, ``state``, ``feasible``, ``val_accuracy``, ``latency_ms``, ``memory_mb``, the chosen
    settings and ``error``. Use it for logging or external tracking; the return value is ignored and an exception
    here is reported but does not fail the trial.
    """
