"""One trial's record: the one schema of a row of ``trials.csv``, the hook's argument, Ray's result and Optuna's
user attributes.

Every outcome is built here (:meth:`TrialRecord.failed`, :meth:`TrialRecord.stopped`, or a completed record filled
in by the runner), so no path can leave a field out: the columns of ``trials.csv`` are this class's fields (plus
the derived ``speedup``, see :data:`COLUMNS`), whichever backend ran the trial. It travels as a plain dict
(:meth:`to_dict`) where a library needs one (Ray's JSON result, Optuna's user attributes, the
``autocompress_trial_completed`` hook).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["COLUMNS", "TrialRecord"]

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

    @classmethod
    def failed(cls, number: int, error: str, **fields: Any) -> "TrialRecord":
        return cls(number, state="FAIL", error=error, **fields)

    @classmethod
    def stopped(cls, number: int, why: str, **fields: Any) -> "TrialRecord":
        """Stopped early (multi-fidelity): PRUNED, with the reason in ``skipped``."""
        return cls(number, state="PRUNED", skipped=why, **fields)

    def cost(self, metric: str) -> float:
        """The budgeted cost (``latency_ms`` or ``memory_mb``)."""
        return float(getattr(self, metric))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialRecord":
        """From :meth:`to_dict` (unknown keys are ignored: a record read back from an older run still loads)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: the columns of trials.csv before the search parameters: the record's fields, ``speedup`` derived after memory
COLUMNS = [f.name for f in dataclasses.fields(TrialRecord)]
COLUMNS.insert(COLUMNS.index("memory_mb") + 1, "speedup")
