"""Searching compression policies: ``search()`` (``run.py``) runs one; a backend (``backend.py``) evaluates its
trials; the run's Optuna study (``study.py``) is what every backend shares.

The package's name is also the function's: ``autocompress.search(...)`` is :func:`search` (``autocompress`` imports
it over the package's name), and ``autocompress.search.run`` is the module.
"""

from autocompress.search.backend import Backend, find_backend
from autocompress.search.run import finish_run, search

__all__ = ["Backend", "find_backend", "finish_run", "search"]
