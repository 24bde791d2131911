"""Errors a user can act on.

Every error caused by input (config, policy, checkpoint, data, budget) is an :class:`InputError` that names the
field or file at fault; the CLI prints it as one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


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
