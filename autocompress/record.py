"""One trial's record: the one schema of a row of ``trials.csv``, the hook's argument, Ray's result and Optuna's
user attributes.

Every outcome is built here (:meth:`TrialRecord.failed`, :meth:`TrialRecord.stopped`, or a completed record filled
in by the runner), so no path can leave a field out: the columns of ``trials.csv`` are this class's fields (plus
the derived ``speedup``, see :data:`COLUMNS`), whichever backend ran the trial. It travels as a plain dict
(:meth:`to_dict`) where a library needs one (Ray's JSON result, Optuna's user attributes, the
``autocompress_trial_completed`` hook).

The builtin costs have their own fields (``latency_ms``, ``memory_mb``); a plugin's cost
(:class:`autocompress.cost_kinds.Cost`) is kept in ``costs`` by its column and flattened into that column by
:meth:`to_dict`, so it lands in ``trials.csv`` like the builtin ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["COLUMNS", "COST_FIELDS", "TrialRecord"]

NAN = math.nan


@dataclass
class TrialRecord:
    number: int
    state: str = "COMPLETE"  # COMPLETE | PRUNED | FAIL (Optuna's states)
    feasible: bool = False  # completed, evaluated, and its budgeted cost within the limit
    val_accuracy: float = NAN  # evaluated only when the costs are within budget
    latency_ms: float = NAN
    predicted_latency_ms: float = NAN  # the latency table's prediction, when there is one
    memory_mb: float = NAN
    simulated: str = ""  # layers whose format has no real kernel here
    origin: str = ""  # baseline | solver | sampler
    baseline: str = ""  # the baseline's label, for a baseline
    seed: str = ""  # the solver's label, for a solver seed
    policy: str = ""  # one-line summary
    skipped: str = ""  # why it was not evaluated, or stopped
    duration_s: float = NAN
    error: str = ""  # why it failed
    progress: str = ""  # intermediate validation probes, "25:0.71 50:0.74"
    node: str = ""  # where it ran (Ray)
    costs: dict[str, float] = dataclasses.field(default_factory=dict)  # a plugin cost's column -> its value

    @classmethod
    def failed(cls, number: int, error: str, **fields: Any) -> "TrialRecord":
        return cls(number, state="FAIL", error=error, **fields)

    @classmethod
    def stopped(cls, number: int, why: str, **fields: Any) -> "TrialRecord":
        """Stopped early (multi-fidelity): PRUNED, with the reason in ``skipped``."""
        return cls(number, state="PRUNED", skipped=why, **fields)

    def cost(self, column: str) -> float:
        """A measured cost by its column (``latency_ms``, ``memory_mb``, a plugin's); NaN when not measured."""
        if column in COST_FIELDS:
            return float(getattr(self, column))
        return float(self.costs.get(column, NAN))

    def set_cost(self, column: str, value: float) -> None:
        if column in COST_FIELDS:
            setattr(self, column, float(value))
        else:
            self.costs[column] = float(value)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(data.pop("costs"))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], costs: tuple[str, ...] = ()) -> "TrialRecord":
        """From :meth:`to_dict`; ``costs``: the plugin cost columns to take back into ``costs`` (other unknown keys
        are ignored: a record read back from an older run still loads)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"costs"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   costs={c: float(data[c]) for c in costs if c in data})


#: the record's fields that hold a builtin cost; a plugin's cost goes into ``TrialRecord.costs``
COST_FIELDS = ("latency_ms", "memory_mb")
#: the columns of trials.csv before the search parameters: the record's fields, ``speedup`` derived after memory
#: (a plugin cost's column follows them, see autocompress.results.trials_frame)
COLUMNS = [f.name for f in dataclasses.fields(TrialRecord) if f.name != "costs"]
COLUMNS.insert(COLUMNS.index("memory_mb") + 1, "speedup")
