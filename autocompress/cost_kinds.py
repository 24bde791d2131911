"""What a budget can limit: a :class:`Cost` says how one cost of a realised model is measured, in which unit, and
under which names a budget refers to it (``latency=0.5x`` by its name, relative to the uncompressed model;
``latency_ms=12`` by its column, absolute).

Costs are registered the way techniques are (``autocompress_register_costs``): latency and memory are the builtin
ones (``autocompress/builtins.py``); a plugin adds another (energy, parameter count, a runtime's latency) in one
file. The measuring functions themselves live in ``autocompress/costs.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from autocompress.runner import RunContext

__all__ = ["Cost", "check_cost"]

#: a cost's name and column are budget words (``name=0.5x``) and a trials.csv column: lowercase, no dots (a column
#: with a dot would read as a search parameter, ``technique.knob``)
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Cost:
    name: str  # "latency": the budget word of a relative limit (latency=0.5x), and how messages name the cost
    column: str  # "latency_ms": the trial record's column, and the budget word of an absolute limit (latency_ms=12)
    unit: str  # "ms"
    #: the cost of a compressed model, ``measure(model, run)``; ``run`` is the :class:`~autocompress.runner.RunContext`
    #: (its ``model`` is the uncompressed model, ``measure`` times a model paired with it, ``config.target`` ...)
    measure: Callable[["nn.Module", "RunContext"], float]
    #: the uncompressed model's cost, the base of a relative limit; None: ``measure`` applied to the uncompressed model
    measure_baseline: Callable[["nn.Module", "RunContext"], float] | None = None
    relative: bool = True  # whether ``name=0.5x`` (a fraction of the uncompressed model's cost) may be asked for
    #: measurable on the structure-only model (weights not loaded, nothing run), like memory: a candidate over its
    #: limit is then skipped before it is compressed for real
    structural: bool = False
    label: str = ""  # axis label in the report ("measured latency (ms)"); default: "<name> (<unit>)"

    @property
    def axis_label(self) -> str:
        return self.label or f"{self.name} ({self.unit})"

    def baseline(self, model: "nn.Module", run: "RunContext") -> float:
        """The uncompressed ``model``'s cost."""
        return float((self.measure_baseline or self.measure)(model, run))


def check_cost(cost: Any) -> None:
    """Raise ``TypeError`` / ``ValueError`` for an object that cannot be registered as a cost."""
    if not isinstance(cost, Cost):
        raise TypeError(f"register() takes a Cost, got {type(cost).__name__}")
    for what in ("name", "column"):
        if not isinstance(getattr(cost, what), str) or not NAME.match(getattr(cost, what)):
            raise ValueError(f"cost {cost.name!r}: {what} {getattr(cost, what)!r} must be lowercase letters, digits "
                             "and underscores")
    from autocompress.record import COLUMNS, COST_FIELDS

    if cost.column in COLUMNS and cost.column not in COST_FIELDS:
        raise ValueError(f"cost {cost.name!r}: column {cost.column!r} is a field of the trial record")
    if not callable(cost.measure):
        raise TypeError(f"cost {cost.name!r}: measure must be a function (model, run) -> float")
