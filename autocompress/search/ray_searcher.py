"""The driver side of the Ray backend: which trial Tune runs next (an Optuna study behind a Tune ``Searcher``) and
which trial it stops early (Tune schedulers).

Why not Ray's ``OptunaSearch``: it hands Optuna nothing but objective values, so the budget constraint
(``trial.set_constraint``), the enqueued baseline policies and the records of ``trials.csv`` would be lost.
:class:`StudySearcher` drives the same study the Optuna backend uses through ask/tell: ``suggest`` asks the study for
a trial (enqueued baselines first) and gives Tune its number and parameters; when Tune reports the trial finished,
its record goes to the study by ``SearchStudy.tell``, as for every backend (the record, the budget as a constraint,
accuracy and cost as values). The study is the whole state: the run directory and ``--resume`` work as for Optuna.

Tune pickles the searcher and the scheduler into its experiment state (``Tuner.restore``), so both keep no state of
their own beyond a session: they read this session's run, study and settings from :data:`_DRIVER`, set by the
backend around ``Tuner.fit``.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from autocompress.compose import simulated_layers
from autocompress.record import TrialRecord
from autocompress.runner import RunContext, format_progress, parse_progress
from autocompress.search.early_stopping import MedianRule, resolve_pruner
from autocompress.search.ray_worker import COST_KEY, NODE_KEY, RECORD_KEY, SCORE_KEY, STEP_KEY
from autocompress.search.study import SearchStudy, record_of

__all__ = ["Driver", "StudySearcher", "make_scheduler"]


@dataclass
class Driver:
    """What the searcher and the scheduler need in this session (never pickled)."""

    run: RunContext
    study: SearchStudy
    max_concurrent: int | None = None
    stopped: dict[str, str] = field(default_factory=dict)  # Tune trial id -> why a scheduler stopped it
    started: dict[str, float] = field(default_factory=dict)  # Tune trial id -> when it was suggested
    trials: dict[str, optuna.Trial] = field(default_factory=dict)  # Tune trial id -> the study's trial


_DRIVER: Driver | None = None


def set_driver(driver: Driver | None) -> None:
    global _DRIVER
    _DRIVER = driver


def _driver() -> Driver:
    if _DRIVER is None:
        raise RuntimeError("the Ray backend's searcher runs only inside autocompress.search.ray_backend")
    return _DRIVER


class StudySearcher(Searcher):
    """A Tune searcher that asks an Optuna study for trials and tells it their records (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(metric=None, mode=None)
        self._live: dict[str, int] = {}  # Tune trial id -> the study's trial number
        self._probes: dict[str, dict[int, float]] = {}  # Tune trial id -> intermediate scores seen so far

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the objectives and the constraint are the study's, not Tune's metric

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return True  # the driver's max_concurrent limits; Tune's limiter only sets how many trials it places ahead

    def suggest(self, trial_id: str) -> dict | str | None:
        d = _driver()
        if d.max_concurrent and len(self._live) >= d.max_concurrent:
            return None
        if d.study.quota_reached():
            # FINISHED only once nothing runs: Tune saves it, and a run interrupted now must still resume
            return Searcher.FINISHED if not self._live else None
        trial = d.study.ask()
        if trial is None:  # an enqueued trial past the total, given back
            return None
        self._live[trial_id] = trial.number
        d.trials[trial_id] = trial
        d.started[trial_id] = time.perf_counter()
        # the driver's correction of the latency table so far (the solver's measured seeds, seeding.second_wave):
        # a worker skips a candidate predicted over the limit by the same rule as a trial run in the driver
        return {"number": trial.number, "params": dict(trial.params),
                "latency_correction": float(d.run.latency_correction)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if STEP_KEY in result and SCORE_KEY in result:
            self._probes.setdefault(trial_id, {})[int(result[STEP_KEY])] = float(result[SCORE_KEY])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._live.pop(trial_id, None)
        probes = self._probes.pop(trial_id, {})
        d = _driver()
        trial = d.trials.pop(trial_id, None)
        if number is None or trial is None:
            return
        result = result or {}
        if STEP_KEY in result and SCORE_KEY in result:  # the probe on which the scheduler stopped it
            probes[int(result[STEP_KEY])] = float(result[SCORE_KEY])
        started = d.started.pop(trial_id, time.perf_counter())
        if RECORD_KEY in result:
            record = json.loads(result[RECORD_KEY])
        elif trial_id in d.stopped or error:
            record = _unfinished_record(d, trial, d.stopped.pop(trial_id, ""), result, probes, error)
            record["duration_s"] = round(time.perf_counter() - started, 3)  # includes waiting for a worker
        else:
            return  # ended with the session (Ctrl-C): stays RUNNING in the study, and --resume runs it again
        d.study.tell(trial, record)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:  # the study holds the state; see the module docstring
            pickle.dump({"version": 1}, fh)

    def restore(self, checkpoint_path: str) -> None:
        # trials of the interrupted session are re-queued in the study by the backend, not resumed by Tune
        self._live.clear()
        self._probes.clear()


def _unfinished_record(d: Driver, trial: optuna.Trial, why: str, result: dict, probes: dict[int, float],
                       error: bool) -> dict[str, Any]:
    """The row of a trial that did not report its record: stopped early by the scheduler, or failed in Ray."""
    policy = d.run.policy(dict(trial.params))
    fields = dict(simulated=" ".join(simulated_layers(policy, d.run.techniques)), policy=policy.summary(),
                  progress=format_progress(probes), node=result.get(NODE_KEY, ""))
    if error:
        record = TrialRecord.failed(
            trial.number, "the Ray trial failed outside the trial code (worker died or could not start; see the Ray "
                          "logs)", **fields)
    else:
        step = max(probes) if probes else 0
        record = TrialRecord.stopped(trial.number, f"stopped early at step {step} ({why})", **fields)
    return record.to_dict()


class _NotesStops:
    """Mixin for Tune schedulers: remember why a trial was stopped, for its row in ``trials.csv``."""

    rule_name = "scheduler"

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        if decision == TrialScheduler.STOP and STEP_KEY in result and _DRIVER is not None:
            _DRIVER.stopped.setdefault(trial.trial_id, f"{self.rule_name}: probe {result[SCORE_KEY]:.4f} below the "
                                                        f"cutoff at step {result[STEP_KEY]}")
        return decision


class HalvingScheduler(_NotesStops, AsyncHyperBandScheduler):
    """Ray's ASHA on the probes of training techniques. Distillation reports after 25, 50, 100, ... steps; with a
    grace period of 1 and a reduction factor of 2 the rungs are powers of two, so each probe meets one rung and a
    trial goes on only while it is in the better half of the trials that reached that rung."""

    def __init__(self, brackets: int = 1) -> None:
        super().__init__(time_attr=STEP_KEY, metric=SCORE_KEY, mode="max", grace_period=1, reduction_factor=2,
                         max_t=2**20, brackets=brackets)
        self.rule_name = "successive halving (Ray ASHA)" if brackets == 1 else "asynchronous Hyperband (Ray)"


class MedianRuleScheduler(FIFOScheduler):
    """The Optuna backend's multi-objective rule (:class:`~autocompress.search.early_stopping.MedianRule`) as a Tune
    scheduler: a trial stops when its probe is below the median of completed trials that cost no more. Comparing
    only with trials that cost no more keeps a cheap trial from being stopped because costlier ones are more
    accurate, which plain ASHA would do in a two-objective search."""

    def __init__(self, rule: MedianRule | None = None) -> None:
        super().__init__()
        self._rule = rule or MedianRule()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if STEP_KEY not in result or _DRIVER is None:
            return TrialScheduler.CONTINUE
        d = _DRIVER
        metric = d.run.budget.metric
        done = d.study.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        records = [record_of(t) for t in done]
        finished = [(parse_progress(r.get("progress")), _number(r.get(metric))) for r in records]
        cost = result.get(COST_KEY)
        why = self._rule.reason_to_stop(int(result[STEP_KEY]), float(result[SCORE_KEY]),
                                        cost if isinstance(cost, float) else math.nan, finished)
        if why:
            d.stopped.setdefault(trial.trial_id, why)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def make_scheduler(objective: str, pruner: str) -> TrialScheduler:
    """The Tune scheduler for ``search.pruner`` (``auto``: the median rule for two objectives, ASHA for one)."""
    rule = resolve_pruner(objective, pruner)
    if rule == "none":
        return FIFOScheduler()
    if rule == "median":
        return MedianRuleScheduler()
    return HalvingScheduler(brackets=3 if rule == "hyperband" else 1)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
