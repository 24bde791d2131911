"""The Ray side of a trial: what runs inside a Ray Tune trial actor, on any node of the cluster.

A trial gets a :class:`WorkerSpec` (the resolved config, the baseline measured by the driver and the techniques),
never the driver's model or data: the worker process loads them itself from the config, once, and keeps them for
every later trial of the run it runs (Tune reuses the actor). Only a model or data handed to ``search()`` as
objects, which no config describes, travel in the spec.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy
from torch import nn

from autocompress.config import RunConfig
from autocompress.data import Dataset
from autocompress.hookspecs import PROJECT
from autocompress.pluginmanager import Plugins
from autocompress.record import TrialRecord
from autocompress.runner import RunContext, TrialReport, evaluate_params, prepare
from autocompress.technique import Technique

__all__ = ["WorkerSpec", "tune_trial", "RECORD_KEY", "STEP_KEY", "SCORE_KEY", "COST_KEY", "NODE_KEY"]

#: keys of the results a trial reports to Tune: the final record (JSON), and each intermediate probe of a technique
#: that trains (its step, score and the trial's cost measured before training) for the early-stopping scheduler
RECORD_KEY = "autocompress_record"
STEP_KEY = "recovery_step"
SCORE_KEY = "recovery_score"
COST_KEY = "recovery_cost"
NODE_KEY = "node"

_RUNS: dict[str, RunContext] = {}  # per worker process: the run it last prepared


@dataclass
class WorkerSpec:
    key: str  # one per search session: a worker that served another run prepares again
    config: RunConfig  # paths made absolute (a Tune worker's working directory is its trial folder)
    baseline: dict[str, float]
    techniques: dict[str, Technique] = field(default_factory=dict)
    model: nn.Module | None = None  # only when the run's model is not described by its config
    data: Dataset | None = None  # only when the run's data are not described by its config
    metric: Any = None  # the run's autocompress.metric.Metric (a user's evaluator travels pickled)
    costs: dict[str, Any] = field(default_factory=dict)  # the registered costs (Cost), for the budget's look-up
    runtimes: dict[str, Any] = field(default_factory=dict)  # the registered runtimes, to time in target.runtime


def worker_run(spec: WorkerSpec) -> RunContext:
    """This process's RunContext for the spec's run, prepared on first use (no baseline measurement: it is given)."""
    run = _RUNS.get(spec.key)
    if run is None:
        _RUNS.clear()  # free the previous run's model and data first
        plugins = Plugins(manager=pluggy.PluginManager(PROJECT), techniques=dict(spec.techniques),
                          costs=dict(spec.costs), runtimes=dict(spec.runtimes))
        # the driver planned the run (the solver's table and seeds); a worker profiles only when the config asks
        # for the latency model by name, to skip candidates on their prediction
        run = prepare(spec.config, plugins=plugins, model=spec.model, data=spec.data, baseline=spec.baseline,
                      log=lambda _: None, latency_model=spec.config.search.latency_model, metric=spec.metric)
        _RUNS[spec.key] = run
    return run


def tune_trial(config: dict[str, Any], spec: WorkerSpec) -> None:
    """One trial: evaluate ``config["params"]`` as Optuna trial ``config["number"]`` and report its record.

    Intermediate probes go to Tune as they come (``tune.report``); when the scheduler stops the trial, Tune ends this
    thread inside that call, and the driver records the trial as stopped early from the probes it saw.
    """
    import ray
    from ray import tune

    node = ray.get_runtime_context().get_node_id()
    number, params = int(config["number"]), dict(config["params"])
    started = time.perf_counter()

    def probe(step: int, value: float, cost: float) -> None:
        tune.report({STEP_KEY: int(step), SCORE_KEY: float(value), COST_KEY: float(cost), NODE_KEY: node})
        return None  # Tune, not the trial, decides: a stopped trial never returns from tune.report

    try:
        run = worker_run(spec)
    except Exception as exc:  # noqa: BLE001 - the worker could not load the run: only this trial fails
        record = TrialRecord.failed(
            number, f"worker could not prepare the run: {type(exc).__name__}: {exc} | "
                    f"{traceback.format_exc(limit=-1).splitlines()[-2].strip()}",
            duration_s=round(time.perf_counter() - started, 3)).to_dict()
    else:
        run.latency_correction = float(config.get("latency_correction", 1.0))  # the driver's, as of this trial
        record = evaluate_params(run, params, number, report=TrialReport(probe))
    record[NODE_KEY] = node
    acc = record.get("val_accuracy")
    tune.report({RECORD_KEY: json.dumps(record, default=_plain), SCORE_KEY: acc if isinstance(acc, float) else math.nan,
                 NODE_KEY: node})


def _plain(value: Any) -> Any:
    """numpy scalars (a plugin's numbers) as Python numbers; anything else as its text."""
    return value.item() if hasattr(value, "item") else str(value)
