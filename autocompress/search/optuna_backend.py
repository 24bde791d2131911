"""The Optuna backend: a study that maximizes validation accuracy and minimizes the budgeted cost, with the budget
as a constraint (``trial.set_constraint``), stored in SQLite (or any Optuna storage URL) so a run can resume."""

from __future__ import annotations

import math
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from autocompress.config import SearchConfig
from autocompress.errors import InputError
from autocompress.runner import RunContext, evaluate_params

STUDY_NAME = "autocompress"
_STATES = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED, "FAIL": TrialState.FAIL}


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=search.seed, multivariate=True, n_startup_trials=10)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=search.seed, population_size=16)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    raise InputError("search.sampler", f"unknown sampler {search.sampler!r}")


def open_study(run: RunContext, storage: str, resume: bool) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["maximize", "minimize"],
        sampler=make_sampler(run.config.search),
        load_if_exists=resume,
    )
    return study


def enqueue_baselines(study: optuna.Study, run: RunContext) -> int:
    """The uncompressed model and each uniform single-technique policy, so every run contains its baselines."""
    queued = [("uncompressed", run.space.uncompressed())]
    queued += list(run.space.uniform_baselines().items())
    for label, params in queued:
        study.enqueue_trial(params, user_attrs={"baseline": label})
    return len(queued)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
            and not t.user_attrs.get("interrupted")]


def fail_interrupted(study: optuna.Study) -> list[dict[str, Any]]:
    """Trials left RUNNING by a killed process: mark them failed (interrupted) and return their params to requeue."""
    requeue = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (process ended during the trial)")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        requeue.append((dict(t.params), dict(t.user_attrs)))
    return requeue


def run_optuna(
    run: RunContext,
    storage: str,
    resume: bool,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> optuna.Study:
    study = open_study(run, storage, resume)
    if not study.trials:
        study.set_user_attr("baseline", run.baseline.to_dict())
        study.set_user_attr("budget", str(run.budget))
        study.set_user_attr("limit", run.limit)
        if run.config.search.baselines:
            enqueue_baselines(study, run)
    else:
        for params, attrs in fail_interrupted(study):
            study.enqueue_trial(params, user_attrs={k: v for k, v in attrs.items() if k == "baseline"})
    limit, metric = run.limit, run.budget.metric
    dims = run.space.dimensions

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {d.name: trial.suggest_categorical(d.name, list(d.choices)) for d in dims}
        record = evaluate_params(run, params, trial.number)
        record.setdefault("baseline", trial.user_attrs.get("baseline", ""))
        for key, value in record.items():
            if key not in ("number", "state"):
                trial.set_user_attr(key, _plain(value))
        if on_trial is not None:
            on_trial(record)
        if record["state"] == "FAIL":
            raise _TrialFailed(record["error"])
        if record["state"] == "PRUNED":
            raise optuna.TrialPruned(record["skipped"])
        cost = record[metric]
        trial.set_constraint("budget", float(cost - limit) if math.isfinite(cost) else 1e9)
        acc = record["val_accuracy"]
        return (acc if math.isfinite(acc) else 0.0), (cost if math.isfinite(cost) else 1e9)

    remaining = run.config.search.trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=run.config.search.timeout_s,
                       catch=(_TrialFailed,), gc_after_trial=True)
    return study


class _TrialFailed(Exception):
    """A trial whose technique failed: Optuna records it as FAIL and the search goes on."""


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
