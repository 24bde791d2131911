"""The budget as Optuna constraints: every limit of the run's budget becomes a constraint of a completed trial
(feasible when <= 0), so the samplers learn the feasible region and the study knows which trials met the budget."""

from __future__ import annotations

import math
from typing import Any

import optuna

from autocompress.builtins import LATENCY
from autocompress.runner import RunContext

__all__ = ["constraint_and_values", "further_constraints", "set_budget_constraints"]


def _cost(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def constraint_and_values(
    record: dict[str, Any], limit: float, metric: str, single: bool
) -> tuple[float, float | tuple[float, float]]:
    """A completed trial's budget constraint (feasible when <= 0) and objective values."""
    cost = _cost(record.get(metric))
    if not math.isfinite(cost) and metric == LATENCY.column and math.isfinite(record.get("predicted_latency_ms", math.nan)):
        cost = record["predicted_latency_ms"]  # skipped on its prediction: the sampler still learns how far over
    acc = record["val_accuracy"]
    acc = acc if math.isfinite(acc) else 0.0
    constraint = float(cost - limit) if math.isfinite(cost) else 1e9
    return constraint, (acc if single else (acc, cost if math.isfinite(cost) else 1e9))


def further_constraints(record: dict[str, Any], limits: dict[str, float]) -> dict[str, float]:
    """The constraints of a budget's further limits (``latency=0.5x,memory=0.5x``: memory), one per cost, after the
    primary one (``budget``); feasible when <= 0. An unmeasured cost counts as far over."""
    out = {}
    for metric, limit in list(limits.items())[1:]:
        cost = _cost(record.get(metric))
        out[f"budget.{metric}"] = float(cost - limit) if math.isfinite(cost) else 1e9
    return out


def set_budget_constraints(trial: optuna.Trial, record: dict[str, Any], run: RunContext,
                           single: bool) -> float | tuple[float, float]:
    """Every limit of the budget as the trial's constraints (``budget``, ``budget.<cost>``); returns the objective
    values to tell Optuna."""
    constraint, values = constraint_and_values(record, run.limit, run.budget.metric, single)
    trial.set_constraint("budget", constraint)
    for key, value in further_constraints(record, run.limits).items():
        trial.set_constraint(key, value)
    return values
