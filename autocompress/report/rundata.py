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
import yaml

from autocompress.budget import Budget
from autocompress.errors import InputError
from autocompress.policy import parse_param_name
from autocompress.results import RECORD_COLUMNS, pareto_front, trials_frame

RUN_FILES = ("trials.csv", "study.db", "config.yaml", "baseline.yaml")
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

    @property
    def metric(self) -> str:
        return self.budget.metric if self.budget is not None else "latency_ms"

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
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise InputError(str(run_dir), f"no autocompress run here (none of {', '.join(RUN_FILES)})")
    notes: list[str] = []
    config = _read_yaml(run_dir / "config.yaml", notes) or {}
    saved_baseline = _read_yaml(run_dir / "baseline.yaml", notes) or {}
    baseline = {k: float(v) for k, v in saved_baseline.items() if isinstance(v, (int, float))}
    slow = saved_baseline.get("slow_choices") if isinstance(saved_baseline, dict) else None
    phases = _read_yaml(run_dir / "phases.yaml", notes) if (run_dir / "phases.yaml").is_file() else None
    solver = _read_csv(run_dir / "solver.csv", notes) if (run_dir / "solver.csv").is_file() else None
    budget = _budget(config, notes)
    limit = math.nan
    if budget is not None:
        if not budget.relative or {"latency_ms", "memory_mb"} <= set(baseline):
            limit = budget.limit(baseline.get("latency_ms", math.nan), baseline.get("memory_mb", math.nan))

    csv_trials = _read_csv(run_dir / "trials.csv", notes)
    study_rows, running = _study_rows(run_dir / "study.db", notes)
    # the search writes trials.csv then pareto.csv when it ends (an interrupted one writes only trials.csv)
    finished = (csv_trials is not None and (run_dir / "pareto.csv").is_file() and running == 0
                and (study_rows is None or len(study_rows) <= len(csv_trials)))
    if finished:
        trials, source = _normalise(csv_trials), "trials.csv"
    elif study_rows is not None:
        trials, source = _normalise(trials_frame(study_rows, baseline.get("latency_ms", math.nan))), "study.db"
    elif csv_trials is not None:
        trials, source = _normalise(csv_trials), "trials.csv"
    else:
        trials, source = _normalise(pd.DataFrame(columns=RECORD_COLUMNS)), ""

    pareto = _read_csv(run_dir / "pareto.csv", notes) if finished else None
    if pareto is None:
        pareto = pareto_front(trials, budget.metric) if budget is not None and len(trials) else trials.iloc[0:0]
    pareto = _normalise(pareto.reset_index(drop=True))
    best_policy = _read_yaml(run_dir / "best_policy.yaml", notes) if finished else None
    return RunData(
        run_dir=run_dir, config=config, baseline=baseline, trials=trials, pareto=pareto,
        params=param_columns(trials.columns), best_policy=best_policy, budget=budget, limit=limit,
        finished=finished, source=source, notes=notes,
        phases={str(k): float(v) for k, v in (phases or {}).items() if isinstance(v, (int, float))},
        slow_choices={str(k): float(v) for k, v in (slow or {}).items() if isinstance(v, (int, float))},
        solver=solver,
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
        return Budget.parse(str(text), field="config.yaml budget")
    except InputError as exc:
        notes.append(str(exc))
        return None


def _read_yaml(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}); left out")
        return None


def _read_csv(path: Path, notes: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=RECORD_COLUMNS)
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc}); left out")
        return None


def _study_rows(path: Path, notes: list[str]) -> tuple[list[dict[str, Any]] | None, int]:
    """Finished trial rows in the Optuna storage and how many trials are running, or ``(None, 0)``."""
    if not path.is_file():
        return None, 0
    try:
        import optuna

        from autocompress.search.study import STUDY_NAME, rows_from_study

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{path.resolve()}")
        running = sum(t.state.name == "RUNNING" and not t.user_attrs.get("interrupted")
                      for t in study.get_trials(deepcopy=False))
        return rows_from_study(study), running
    except Exception as exc:  # a broken or foreign database must not stop the report
        notes.append(f"study.db could not be read ({type(exc).__name__}: {exc})")
        return None, 0
