"""Errors a user can act on.

Every error caused by input (config, policy, checkpoint, data, budget) is an :class:`InputError` that names the
field or file at fault; the CLI prints it as one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


def yaml_error_where(exc: Exception) -> str:
    """Where a YAML parse error is, for a one-line :class:`InputError`: ``"<problem> at line L, column C"``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


class AutocompressError(Exception):
    """Base class of the errors autocompress raises on purpose."""


class InputError(AutocompressError, ValueError):
    """Bad user input. ``field`` is the dotted config key, policy key or file path that is wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class TechniqueError(AutocompressError):
    """A technique plugin failed while compressing one trial's model; only that trial fails."""


class NoFeasiblePolicy(AutocompressError):
    """The search finished without a single policy that meets the budget."""


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search. Carries the rows of the trials that finished, so they are saved before exiting;
    the trial that was cut short is marked interrupted and runs again on ``--resume``."""

    def __init__(self, rows: list) -> None:
        super().__init__("search interrupted")
        self.rows = rows
