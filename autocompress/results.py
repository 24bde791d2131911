"""Search results: the trials table, the feasible Pareto front (with test accuracy), the best policy, and the
files of a run directory (``trials.csv``, ``pareto.csv``, ``best_policy.yaml``, ``config.yaml``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from autocompress.policy import Policy
from autocompress.record import COLUMNS
from autocompress.rundir import TRIALS

#: the columns of trials.csv before the search parameters (autocompress.record: one schema for every backend)
RECORD_COLUMNS = COLUMNS


@dataclass
class SearchResult:
    trials: pd.DataFrame
    pareto: pd.DataFrame
    best_policy: Policy | None
    baseline: dict[str, float]
    budget: str
    limit: float
    metric: str  # the budgeted cost's column (latency_ms, memory_mb, a plugin cost's)
    run_dir: Path | None = None
    #: when no trial met the budget: the closest ones, with validation accuracy measured for them (else None)
    closest: pd.DataFrame | None = None
    unit: str = ""  # of the budgeted cost ("ms"); "" for a result made before costs had units: taken from the column

    @property
    def score_name(self) -> str:
        """The metric the search maximized (``accuracy`` unless another was chosen); the ``val_accuracy`` and
        ``test_accuracy`` columns hold it whatever it is."""
        return str(self.baseline.get("metric") or "accuracy")

    @property
    def best(self) -> dict[str, Any] | None:
        return None if self.pareto.empty else self.pareto.iloc[0].to_dict()

    @property
    def feasible(self) -> bool:
        return self.best_policy is not None


#: how far the uncompressed model's own trial may measure from the baseline before a run warns about its timings
DRIFT_TOLERANCE = 0.25


def timing_drift(frame: pd.DataFrame, baseline_latency_ms: float) -> str | None:
    """A warning when the uncompressed model, timed again as a trial, disagrees with the baseline measured at the start.

    Every speedup and every relative latency budget hangs on that baseline; when the two differ by more than
    :data:`DRIFT_TOLERANCE` the machine's load changed during the run (another process, a spinning OpenMP pool) and
    the measured latencies are not comparable with each other. None when they agree or when there is nothing to
    compare.
    """
    if not len(frame) or "baseline" not in frame or not math.isfinite(baseline_latency_ms) or baseline_latency_ms <= 0:
        return None
    rows = frame[(frame["baseline"] == "uncompressed")]
    latency = pd.to_numeric(rows["latency_ms"], errors="coerce").dropna()
    if latency.empty:
        return None
    ratio = float(latency.iloc[0]) / baseline_latency_ms
    if abs(math.log(ratio)) <= math.log1p(DRIFT_TOLERANCE):
        return None
    return (f"the uncompressed model measured {float(latency.iloc[0]):.2f} ms as trial "
            f"{int(rows.loc[latency.index[0], 'number'])} but {baseline_latency_ms:.2f} ms at the start "
            f"({ratio:.2f}x): the machine's load changed during the run, so latencies and speedups are not comparable "
            "(run on a quiet machine; see README 'When things go wrong')")


def is_param_column(name: Any) -> bool:
    """Whether a trials.csv column is a search parameter (``<layer>:<technique>.<knob>`` or ``<technique>.<knob>``),
    not a record field nor a plugin cost's column (a cost column has no dot, see autocompress.cost_kinds)."""
    return name not in RECORD_COLUMNS and "." in str(name)


def trials_frame(rows: Iterable[dict[str, Any]], baseline_latency_ms: float) -> pd.DataFrame:
    """The rows as trials.csv: the record's columns, then the plugins' cost columns, then the search parameters."""
    frame = pd.DataFrame(list(rows))
    for col in RECORD_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    if len(frame):
        frame["speedup"] = baseline_latency_ms / pd.to_numeric(frame["latency_ms"], errors="coerce")
        frame["feasible"] = frame["feasible"].fillna(False).astype(bool)
        frame = frame.sort_values("number", kind="stable").reset_index(drop=True)
    costs = [c for c in frame.columns if c not in RECORD_COLUMNS and not is_param_column(c)]
    params = sorted(c for c in frame.columns if is_param_column(c))
    return frame[RECORD_COLUMNS + costs + params]


def pareto_front(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Feasible, completed trials that no other such trial beats on both accuracy and the budgeted cost.

    Sorted by validation accuracy (best first), then cost.

    Not Optuna's ``Study.best_trials``, though every backend's trials live in a constrained study: with
    ``search.objective: single`` the study has one objective and ``best_trials`` is the one most accurate trial,
    while the result is always the accuracy/cost front; and the front is taken over the rows of ``trials.csv``
    (the same function serves the report of a run directory), with identical policies measured twice as one point.
    """
    ok = frame[(frame["state"] == "COMPLETE") & frame["feasible"]].copy()
    ok = ok[pd.to_numeric(ok["val_accuracy"], errors="coerce").notna()]
    if ok.empty:
        return ok
    acc = ok["val_accuracy"].astype(float).to_numpy()
    cost = ok[metric].astype(float).to_numpy()
    keep = []
    for i in range(len(ok)):
        dominated = any(
            (acc[j] >= acc[i] and cost[j] <= cost[i]) and (acc[j] > acc[i] or cost[j] < cost[i]) for j in range(len(ok))
        )
        keep.append(not dominated)
    front = ok[keep].sort_values(["val_accuracy", metric], ascending=[False, True], kind="stable")
    # identical policies measured twice (e.g. a baseline re-sampled) are one point
    return front.drop_duplicates(subset=["policy", "val_accuracy"]).reset_index(drop=True)


def params_of(row: dict[str, Any], frame_columns: Iterable[str]) -> dict[str, Any]:
    out = {}
    for col in frame_columns:
        if not is_param_column(col):
            continue
        value = row.get(col)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[col] = value
    return out


def summary_table(result: SearchResult, limit_rows: int = 8) -> str:
    """A plain-text table of the Pareto set, for the end of a search."""
    base = result.baseline
    acc = _short(result.score_name)
    plugin_costs = "".join(f", {column} {value:.4g}" for column, value in (base.get("costs") or {}).items())
    lines = [
        f"budget {result.budget}: {result.metric} <= {result.limit:.3f}  "
        f"(uncompressed: {base['latency_ms']:.2f} ms, {base['memory_mb']:.3f} MB{plugin_costs}, "
        f"val {acc} {base['val_accuracy']:.4f}"
        + (f", test {acc} {base['test_accuracy']:.4f}" if "test_accuracy" in base else "")
        + ")"
    ]
    runtime = base.get("runtime", "torch")
    if runtime != "torch":
        lines.append(f"latency measured in {runtime}; 'final' re-timed there at the end, 'torch' in torch eager")
    if result.score_name != "accuracy":
        lines.append(f"scored by the metric {result.score_name!r} (held in the val_accuracy and test_accuracy columns)")
    n_ok = int((result.trials["state"] == "COMPLETE").sum()) if len(result.trials) else 0
    n_feasible = int(result.trials["feasible"].sum()) if len(result.trials) else 0
    lines.append(f"{len(result.trials)} trials, {n_ok} completed, {n_feasible} within budget")
    if result.pareto.empty:
        lines.append("no policy met the budget")
        return "\n".join(lines)
    header = (f"{'trial':>5} {'val ' + acc:>8} {'test ' + acc:>8} {'latency ms':>10} {'predicted':>9} {'speedup':>7} "
              f"{'memory MB':>9}  policy")
    lines.append(header)
    retimed = "latency_ms_final" in result.pareto.columns
    if retimed:
        lines[-1] = lines[-1].replace("  policy", f" {'final ms':>8} {'torch ms':>8}  policy")
    for _, row in result.pareto.head(limit_rows).iterrows():
        sim = " [simulated formats]" if row.get("simulated") else ""
        again = ""
        if retimed:
            again = "".join(f" {row[c]:8.2f}" if pd.notna(row[c]) else f" {'-':>8}"
                            for c in ("latency_ms_final", "latency_ms_torch"))
        test = row.get("test_accuracy")
        test_s = f"{test:8.4f}" if isinstance(test, float) and not math.isnan(test) else f"{'-':>8}"
        predicted = pd.to_numeric(pd.Series([row.get("predicted_latency_ms")]), errors="coerce").iloc[0]
        predicted_s = f"{predicted:9.2f}" if pd.notna(predicted) else f"{'-':>9}"  # from the latency model, if used
        lines.append(
            f"{int(row['number']):>5} {row['val_accuracy']:8.4f} {test_s} {row['latency_ms']:10.2f} {predicted_s} "
            f"{row['speedup']:7.2f} {row['memory_mb']:9.3f}{again}  {row['policy']}{sim}"
        )
    return "\n".join(lines)


def closest_to_budget(frame: pd.DataFrame, metric: str, limit: float, n: int = 3) -> pd.DataFrame:
    """The ``n`` completed trials whose measured budgeted cost came nearest the limit (over it, when no trial met it)."""
    if frame.empty:
        return frame
    cost = pd.to_numeric(frame[metric], errors="coerce")
    measured = frame[cost.notna() & (frame["state"] == "COMPLETE")].copy()
    measured["_distance"] = (cost[measured.index] - limit).abs()
    return measured.sort_values(["_distance", "number"], kind="stable").head(n).drop(columns="_distance")


def no_feasible_message(result: SearchResult) -> str:
    """What to tell a user whose whole search found nothing within the budget: a plain statement, the closest
    policies with their measured cost and validation accuracy, and where the rest is."""
    unit, acc_name = _unit(result), _short(result.score_name)
    lines = [
        f"no policy met the budget {result.budget} ({result.metric} <= {result.limit:.3f}) in {len(result.trials)} "
        f"trials."
    ]
    closest = result.closest if result.closest is not None else closest_to_budget(result.trials, result.metric, result.limit)
    if closest.empty:
        lines.append("No trial could be measured (see the error column of trials.csv).")
    else:
        lines.append(f"The {len(closest)} closest:")
        for _, row in closest.iterrows():
            cost = float(row[result.metric])
            acc = pd.to_numeric(pd.Series([row["val_accuracy"]]), errors="coerce").iloc[0]
            acc_s = f"val {acc_name} {acc:.4f}" if pd.notna(acc) else f"val {acc_name} not measured"
            lines.append(
                f"  trial {int(row['number'])}: {cost:.3f} {unit} ({cost / result.limit:.2f}x the limit), {acc_s}, "
                f"{row['policy'] or 'uncompressed'}"
            )
    if result.run_dir is not None:
        lines.append(f"All trials: {result.run_dir / TRIALS}")
    return "\n".join(lines)


def _unit(result: SearchResult) -> str:
    return result.unit or {"latency_ms": "ms", "memory_mb": "MB"}.get(result.metric, "")


def _short(score_name: str) -> str:
    """How the summary names the metric: ``acc`` for accuracy, else the metric's own name."""
    return "acc" if score_name == "accuracy" else score_name
