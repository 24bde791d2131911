"""Read a run directory into what the report shows, using only the files in it.

A finished run has ``trials.csv`` and ``pareto.csv`` (written by the search when it ends). A run still going (or
stopped before it ended) has only ``config.yaml``, ``baseline.yaml`` and the Optuna storage ``study.db``: its finished
trials are read from the storage and the Pareto front is computed from them, without test accuracy (the test split
is evaluated only when a search ends). When the storage holds more finished trials than ``trials.csv`` (a resumed
run in progress), the storage wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from autocompress import rundir
from autocompress.budget import Budget
from autocompress.cost_kinds import Cost
from autocompress.errors import InputError
from autocompress.policy import parse_param_name
from autocompress.results import RECORD_COLUMNS, pareto_front, trials_frame
from autocompress.rundir import RunDir

_TEXT_COLUMNS = ("state", "simulated", "origin", "baseline", "seed", "policy", "skipped", "error")


@dataclass(frozen=True)
class ParamColumn:
    """One search parameter column of ``trials.csv``: ``<layer>:<technique>.<knob>`` or ``<technique>.<knob>``."""

    name: str
    technique: str
    knob: str
    layer: str | None

    @property
    def key(self) -> str:
        return f"{self.technique}.{self.knob}"


@dataclass
class RunData:
    """Everything the report shows, read from one run directory."""

    run_dir: Path
    config: dict[str, Any]
    baseline: dict[str, float]
    trials: pd.DataFrame
    pareto: pd.DataFrame
    params: list[ParamColumn]
    best_policy: dict[str, Any] | None
    budget: Budget | None
    limit: float  # NaN when unknown
    finished: bool
    source: str  # where the trials came from: "trials.csv", "study.db" or "" (none yet)
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # phases.yaml: what the run did, in seconds
    slow_choices: dict[str, float] = field(default_factory=dict)  # left out of the search on this CPU (screening)
    solver: pd.DataFrame | None = None  # solver.csv: the solver's seeds
    #: parameter name -> the value that leaves its layer as it is (resolved_space.yaml; None for an older run)
    identities: dict[str, Any] | None = None
    #: the metric the search maximized (baseline.yaml); the val_accuracy / test_accuracy columns hold it whatever it is
    score_name: str = "accuracy"

    @property
    def metric(self) -> str:
        return self.budget.metric if self.budget is not None else "latency_ms"

    @property
    def unit(self) -> str:
        """The budgeted cost's unit ("ms")."""
        return self.budget.cost.unit if self.budget is not None else "ms"

    @property
    def cost_name(self) -> str:
        """The budgeted cost's name ("latency")."""
        return self.budget.cost.name if self.budget is not None else "latency"

    @property
    def feasible(self) -> bool:
        return not self.pareto.empty

    @property
    def best(self) -> pd.Series | None:
        return None if self.pareto.empty else self.pareto.iloc[0]

    @property
    def planned_trials(self) -> int | None:
        value = (self.config.get("search") or {}).get("trials")
        return int(value) if isinstance(value, (int, float)) else None

    def uncompressed_row(self) -> pd.Series | None:
        rows = self.trials[self.trials["baseline"] == "uncompressed"]
        return None if rows.empty else rows.iloc[0]


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir``; raises :class:`InputError` when it holds no autocompress run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(str(run_dir), "not a directory (give the run directory a search wrote, e.g. runs/demo)")
    rd = RunDir(run_dir)
    if not rd.holds_run():
        raise InputError(str(run_dir), f"no autocompress run here (none of {', '.join(rundir.RUN_FILES)})")
    notes: list[str] = []
    config = rd.read_yaml(rundir.CONFIG, notes) or {}
    saved_baseline = rd.read_yaml(rundir.BASELINE, notes) or {}
    baseline = {k: float(v) for k, v in saved_baseline.items() if isinstance(v, (int, float))}
    plugin_costs = saved_baseline.get("costs") if isinstance(saved_baseline, dict) else None
    # a plugin cost's baseline, by its column, beside latency_ms and memory_mb (autocompress.runner.Baseline)
    baseline.update({str(k): float(v) for k, v in (plugin_costs or {}).items() if isinstance(v, (int, float))})
    score_name = str((saved_baseline or {}).get("metric") or "accuracy") if isinstance(saved_baseline, dict) else "accuracy"
    slow = saved_baseline.get("slow_choices") if isinstance(saved_baseline, dict) else None
    phases = rd.read_yaml(rundir.PHASES, notes)
    solver = rd.read_csv(rundir.SOLVER, notes)
    budget = _budget(config, notes)
    limit = math.nan
    if budget is not None:
        if not budget.relative or budget.metric in baseline:
            limit = budget.limit(baseline)

    csv_trials = rd.read_csv(rundir.TRIALS, notes)
    study_rows, running = rd.read_study(notes)
    finished = (csv_trials is not None and rd.is_finished() and running == 0
                and (study_rows is None or len(study_rows) <= len(csv_trials)))
    if finished:
        trials, source = _normalise(csv_trials), rundir.TRIALS
    elif study_rows is not None:
        trials, source = _normalise(trials_frame(study_rows, baseline.get("latency_ms", math.nan))), rundir.STUDY
    elif csv_trials is not None:
        trials, source = _normalise(csv_trials), rundir.TRIALS
    else:
        trials, source = _normalise(pd.DataFrame(columns=RECORD_COLUMNS)), ""

    pareto = rd.read_csv(rundir.PARETO, notes) if finished else None
    if pareto is None:
        pareto = pareto_front(trials, budget.metric) if budget is not None and len(trials) else trials.iloc[0:0]
    pareto = _normalise(pareto.reset_index(drop=True))
    best_policy = rd.read_yaml(rundir.BEST_POLICY, notes) if finished else None
    return RunData(
        run_dir=run_dir, config=config, baseline=baseline, trials=trials, pareto=pareto,
        params=param_columns(trials.columns), best_policy=best_policy, budget=budget, limit=limit,
        finished=finished, source=source, notes=notes,
        phases={str(k): float(v) for k, v in (phases or {}).items() if isinstance(v, (int, float))},
        slow_choices={str(k): float(v) for k, v in (slow or {}).items() if isinstance(v, (int, float))},
        solver=solver, identities=rd.read_identities(notes), score_name=score_name,
    )


def param_columns(columns) -> list[ParamColumn]:
    """The search-parameter columns, recognised by their name (so a third-party technique's knobs are found too)."""
    out = []
    for name in columns:
        if name in RECORD_COLUMNS or ("." not in str(name)):
            continue
        try:
            technique, knob, layer = parse_param_name(str(name))
        except InputError:
            continue
        out.append(ParamColumn(str(name), technique, knob, layer))
    return out


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for col in RECORD_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    for col in _TEXT_COLUMNS:
        frame[col] = frame[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    for col in ("val_accuracy", "latency_ms", "memory_mb", "speedup", "duration_s", "test_accuracy"):
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["feasible"] = frame["feasible"].map(_truthy).astype(bool)
    if len(frame):
        frame["number"] = pd.to_numeric(frame["number"], errors="coerce").astype("Int64")
    return frame


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def _budget(config: dict[str, Any], notes: list[str]) -> Budget | None:
    text = config.get("budget")
    if not text:
        return None
    try:
        return Budget.parse(str(text), field="config.yaml budget", costs=_costs(str(text), config))
    except InputError as exc:
        notes.append(str(exc))
        return None


def _costs(text: str, config: dict[str, Any]) -> dict[str, Cost]:
    """The installed plugins' costs, and a stand-in for a word none of them names (a cost registered in code by
    the process that ran the search): the report then still shows the budget and reads the column it names."""
    from autocompress.pluginmanager import load_plugins

    block = (config.get("plugins") or {}).get("block", ()) if isinstance(config.get("plugins"), dict) else ()
    costs = dict(load_plugins(block=block).costs)
    words = {w for c in costs.values() for w in (c.name, c.column)}
    for word, _value, _relative in Budget.read(text, field="config.yaml budget"):
        if word not in words:
            costs[word] = Cost(word, word, "", _not_measured)
    return costs


def _not_measured(model: Any, run: Any) -> float:
    raise RuntimeError("a report does not measure")
