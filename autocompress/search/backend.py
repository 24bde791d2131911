"""What a search backend is: the part of a search that decides where each trial is evaluated.

Everything else is shared by every backend (``run.py``, ``study.py``): the run's checks and files, the Optuna study
with its queue, quota, constraints and rows, the progress bar and the ``autocompress_trial_completed`` hook. A
backend takes trials from the study by :meth:`SearchStudy.ask`, evaluates each with
:func:`autocompress.runner.evaluate_params` (in this process, in a worker, on a cluster) and gives back its record by
:meth:`SearchStudy.tell`, until :meth:`SearchStudy.quota_reached` or ``run.config.search.timeout_s``.

The builtin backends are ``optuna`` (trials in this process; with a ``storage`` URL, one of several processes sharing
the study) and ``ray`` (Ray Tune trials on a Ray cluster). A plugin adds one with the
``autocompress_register_backends`` hook; it is then chosen by name (``search.backend``, ``--backend``), like a
technique.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from autocompress.errors import InputError

if TYPE_CHECKING:
    from autocompress.pluginmanager import Plugins
    from autocompress.runner import RunContext
    from autocompress.search.study import SearchStudy

__all__ = ["Backend", "find_backend"]


@runtime_checkable
class Backend(Protocol):
    """Where trials are evaluated. ``run`` returns once the study's quota is reached or the timeout has passed; a
    Ctrl-C may end it with ``KeyboardInterrupt`` (the trials told so far are saved) or with ``SearchInterrupted``.
    Extra ``options`` are the backend's own (``autocompress.search(..., backend_options=...)``)."""

    name: str
    #: several trials run at once: the sampler then treats running trials as bad results (constant liar)
    parallel: bool

    def run(self, run: "RunContext", study: "SearchStudy", run_dir: Path, resume: bool,
            log: Callable[[str], None], **options: Any) -> None: ...


def find_backend(name: str, plugins: "Plugins") -> Backend:
    """The backend registered as ``name`` (a builtin one is imported only now: Ray is heavy)."""
    found = plugins.backends.get(name)
    if found is None:
        raise InputError("search.backend", f"unknown backend {name!r} ({', '.join(sorted(plugins.backends))})")
    if isinstance(found, str):  # a builtin, "module:Class"
        module, _, cls = found.partition(":")
        found = getattr(importlib.import_module(module), cls)()
    return found
