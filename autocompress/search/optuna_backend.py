"""The Optuna backend: a study that maximizes validation accuracy and minimizes the budgeted cost, with the budget
as a constraint (``trial.set_constraint``), stored in SQLite (or any Optuna storage URL) so a run can resume.
With ``search.objective: single`` it maximizes accuracy alone (budget still a constraint) so Optuna's pruners can
stop training trials early; see ``early_stopping.py`` for what stops them in the multi-objective study."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from autocompress.builtins import LATENCY
from autocompress.config import SearchConfig, measured_baselines
from autocompress.errors import InputError
from autocompress.rundir import STUDY_NAME
from autocompress.runner import RunContext, TrialReport, evaluate_params, parse_progress
from autocompress.search.early_stopping import MedianRule, resolve_pruner
from autocompress.search.storage import interruptible

#: what an enqueued trial carries into its record: the baseline's label, where it came from, the solver's label
QUEUED_ATTRS = ("baseline", "origin", "seed")
_STATES = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED, "FAIL": TrialState.FAIL}


def make_sampler(search: SearchConfig, seed: int | None = None, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """``parallel``: trials run concurrently (Ray, shared storage), so TPE treats running trials as bad results
    (constant liar) instead of proposing the same policy to several workers."""
    seed = search.seed if seed is None else seed
    if search.sampler == "tpe":
        # with the solver, its seeds (and the uncompressed model) are the start: TPE models around them at once
        startup = 1 + len(search.solver_fractions) if search.strategy == "solve" else 10
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup,
                                          constant_liar=parallel)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise InputError("search.sampler", f"unknown sampler {search.sampler!r}")


def make_pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    """Optuna's pruner for a single-objective study; a multi-objective one prunes with :class:`MedianRule`.

    Reports come at steps 25, 50, 100, ...: with ``min_resource=1`` and a reduction factor of 2, each report meets
    about one successive-halving rung, so a trial goes on only while it is in the better half at its step.
    """
    name = resolve_pruner(search.objective, search.pruner)
    if search.objective != "single" or name == "none":
        return optuna.pruners.NopPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def open_study(run: RunContext, storage: str | optuna.storages.BaseStorage, resume: bool) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    single = run.config.search.objective == "single"
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["maximize"] if single else ["maximize", "minimize"],
        sampler=make_sampler(run.config.search),
        pruner=make_pruner(run.config.search),
        load_if_exists=resume,
    )
    if len(study.directions) != (1 if single else 2):
        was = "single" if len(study.directions) == 1 else "multi"
        raise InputError("search.objective", f"the run being resumed was searched with objective {was!r}")
    if study.trials:
        # A fresh sampler with the run's seed would replay the random draws of the first session and repeat its
        # policies; offsetting the seed by the trials so far keeps a resumed run reproducible without repeats.
        study.sampler = make_sampler(run.config.search, seed=run.config.search.seed + len(study.trials))
    _quiet_failed_trial_warnings()
    return study


class _NoFailedTrialWarnings(logging.Filter):
    """Optuna logs each failed trial with a traceback; the reason is already in trials.csv, so keep stderr clean."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Trial ") and " failed with " in message)


def _quiet_failed_trial_warnings() -> None:
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoFailedTrialWarnings) for f in logger.filters):
        logger.addFilter(_NoFailedTrialWarnings())


def enqueue_baselines(study: optuna.Study, run: RunContext) -> int:
    """The first trials of every study: the uncompressed model, the solver's seeds (``seeding.py``) and, where they
    are measured (``search.baselines``), each uniform single-technique policy; ``baselines: false`` leaves out
    the uncompressed model too."""
    queued = 0
    if run.config.search.baselines is not False:
        study.enqueue_trial(run.space.uncompressed(), user_attrs={"baseline": "uncompressed", "origin": "baseline"})
        queued += 1
    for seed in run.seeds:
        study.enqueue_trial(seed.params, user_attrs={"origin": "solver", "seed": seed.label})
        queued += 1
    if measured_baselines(run.config.search):
        for label, params in run.space.uniform_baselines().items():
            study.enqueue_trial(params, user_attrs={"baseline": label, "origin": "baseline"})
            queued += 1
    return queued


def enqueue_composed(study: optuna.Study, run: RunContext) -> int:
    """Once every enqueued baseline has finished, queue the chain of compositions that
    :meth:`ResolvedSpace.composed_baselines` builds from their measured costs toward the budget: the cheapest
    baseline plus, one at a time, each other knob's cheapest uniform value. Measured, so it follows the machine, and
    it gives the sampler starts in the corner a tight budget needs. Queued once per study (a study attribute says
    so, also across resumes); two workers of a shared storage finishing the last baselines at the same moment may
    both queue it. Returns how many were queued."""
    if not measured_baselines(run.config.search) or study.user_attrs.get("composed"):
        return 0
    labels = {"uncompressed", *run.space.uniform_baselines()}
    metric = run.budget.metric
    costs: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False):
        label = t.user_attrs.get("baseline")
        if label not in labels:
            continue
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            return 0
        cost = _cost(t.user_attrs.get(metric))
        if not math.isfinite(cost) and run.budget.cost is LATENCY:  # skipped on its prediction (the latency table)
            cost = _cost(t.user_attrs.get("predicted_latency_ms"))
        costs[label] = cost
    if set(costs) != labels:
        return 0
    study.set_user_attr("composed", True)
    queued = 0
    for label, params in run.space.composed_baselines(costs, run.limit).items():
        study.enqueue_trial(params, user_attrs={"baseline": label, "origin": "baseline"})
        queued += 1
    return queued


def enqueue_second_wave(study: optuna.Study, run: RunContext) -> int:
    """Once every solver seed queued so far has finished, the solver's next wave (``seeding.second_wave``): solved
    again with the limit corrected by the measured / predicted cost of all its trials so far, excluding what was
    tried, so each wave proposes the next best policies. Up to ``search.solver_waves`` waves per study."""
    solver = getattr(run, "solver", None)
    done = int(study.user_attrs.get("solver_waves", 0))
    if solver is None or done >= run.config.search.solver_waves:
        return 0
    seeds = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("origin") == "solver"]
    if not seeds or any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in seeds):
        return 0
    from autocompress.seeding import second_wave

    metric = run.budget.metric
    measured = []
    for t in seeds:
        cost = _cost(t.user_attrs.get(metric))
        # the solver predicts latency from the table; any other cost it computes from the realised structure
        predicted = _cost(t.user_attrs.get("predicted_latency_ms")) if run.budget.cost is LATENCY else cost
        measured.append((predicted, cost))
    study.set_user_attr("solver_waves", done + 1)
    queued = second_wave(solver, measured, wave=done + 2)
    for seed in queued:
        study.enqueue_trial(seed.params, user_attrs={"origin": "solver", "seed": seed.label})
    return len(queued)


def enqueue_followups(study: optuna.Study, run: RunContext) -> int:
    """What a finished trial may unlock: the composed baselines, the solver's second wave."""
    return enqueue_composed(study, run) + enqueue_second_wave(study, run)


def composed_callback(run: RunContext) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """For ``study.optimize(callbacks=...)``: called after each trial is finished (no longer RUNNING)."""
    return lambda study, _trial: enqueue_followups(study, run)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
            and not t.user_attrs.get("interrupted")]


def mark_interrupted(study: optuna.Study, why: str = "interrupted (process ended during the trial)") -> None:
    """Close the trials left RUNNING by a session that ended (killed, or stopped by Ctrl-C between Optuna's steps):
    failed and marked interrupted, so they are not counted and run again on resume. Only for a study that no other
    process is running trials of."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, "error", why)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def fail_interrupted(study: optuna.Study) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Trials cut short by an earlier session, to run again: those left RUNNING by a killed process (marked failed
    and interrupted here) and those stopped by Ctrl-C (already failed and marked interrupted).

    Each is handed out once: the numbers handed out are kept in the study's ``requeued`` attribute.
    """
    mark_interrupted(study)
    done = set(study.user_attrs.get("requeued", []))
    requeue, numbers = [], []
    for t in study.get_trials(deepcopy=False):
        if not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")) or t.number in done:
            continue
        # killed while its parameters were being drawn, an enqueued trial still has them all in fixed_params
        requeue.append(({**t.system_attrs.get("fixed_params", {}), **t.params}, dict(t.user_attrs)))
        numbers.append(t.number)
    if numbers:
        study.set_user_attr("requeued", sorted(done | set(numbers)))
    return requeue


def start_or_recover(study: optuna.Study, run: RunContext) -> None:
    """A new study records the run's baseline and budget and queues the baselines; a resumed one re-queues the
    trials a killed process left running."""
    if not study.trials:
        study.set_user_attr("baseline", run.baseline.to_dict())
        study.set_user_attr("budget", str(run.budget))
        study.set_user_attr("limit", run.limit)
        enqueue_baselines(study, run)
    else:
        for params, attrs in fail_interrupted(study):
            study.enqueue_trial(params, user_attrs={k: v for k, v in attrs.items() if k in QUEUED_ATTRS})


def run_optuna(
    run: RunContext,
    storage: str | optuna.storages.BaseStorage,
    resume: bool,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> optuna.Study:
    study = open_study(run, storage, resume)
    start_or_recover(study, run)
    objective = make_objective(run, study, on_trial)
    remaining = run.config.search.trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=run.config.search.timeout_s,
                       catch=(_TrialFailed,), callbacks=[composed_callback(run)])
    return study


def make_objective(
    run: RunContext,
    study: optuna.Study,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """The function Optuna calls for each trial, shared by the one-process search and the workers of a shared
    storage (``shared_study.py``); ``extra`` fields are added to every record (e.g. which worker ran it)."""
    metric = run.budget.metric
    dims = run.space.dimensions

    single = run.config.search.objective == "single"
    pruner = resolve_pruner(run.config.search.objective, run.config.search.pruner)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            return evaluate_trial(trial)
        except KeyboardInterrupt:  # Ctrl-C: this trial did not finish; --resume runs it again
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("error", "interrupted (Ctrl-C during the trial)")
            raise

    def evaluate_trial(trial: optuna.Trial) -> float | tuple[float, float]:
        params = {d.name: trial.suggest_categorical(d.name, list(d.choices)) for d in dims}
        report = None if pruner == "none" else trial_report(study, trial, pruner, single, metric)
        with interruptible():  # the trial's own work; Ctrl-C elsewhere waits for the storage and Optuna
            record = evaluate_params(run, params, trial.number, report=report)
        record.update(extra or {})
        label_record(record, trial)
        for key, value in record.items():
            if key not in ("number", "state"):
                trial.set_user_attr(key, _plain(value))
        if on_trial is not None:
            on_trial(record)
        if record["state"] == "FAIL":
            raise _TrialFailed(record["error"])
        if record["state"] == "PRUNED":
            raise optuna.TrialPruned(record["skipped"])
        return set_budget_constraints(trial, record, run, single)

    return objective


def label_record(record: dict[str, Any], trial: optuna.Trial) -> None:
    """What the queue said about a trial (its baseline label, the solver's label) into its record; a trial nobody
    queued came from the sampler."""
    for key in QUEUED_ATTRS:
        if not record.get(key):
            record[key] = trial.user_attrs.get(key, "")
    record["origin"] = record["origin"] or "sampler"


def constraint_and_values(
    record: dict[str, Any], limit: float, metric: str, single: bool
) -> tuple[float, float | tuple[float, float]]:
    """A completed trial's budget constraint (feasible when <= 0) and objective values, for every backend that
    tells Optuna a trial record (this objective, and the Ray backend's searcher)."""
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
    values to tell Optuna. Shared by this objective and the Ray backend's searcher."""
    constraint, values = constraint_and_values(record, run.limit, run.budget.metric, single)
    trial.set_constraint("budget", constraint)
    for key, value in further_constraints(record, run.limits).items():
        trial.set_constraint(key, value)
    return values


def trial_report(study: optuna.Study, trial: optuna.Trial, pruner: str, single: bool, metric: str) -> TrialReport:
    """How one trial's intermediate scores reach the early-stopping rule (see ``early_stopping.py``)."""
    if single:
        def decide(step: int, value: float, cost: float) -> str | None:
            trial.report(value, step)
            return f"{pruner} pruner" if trial.should_prune() else None
    else:
        rule = MedianRule()

        def decide(step: int, value: float, cost: float) -> str | None:
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            finished = [(parse_progress(t.user_attrs.get("progress")), _cost(t.user_attrs.get(metric))) for t in done]
            return rule.reason_to_stop(step, value, cost, finished)
    return TrialReport(decide)


def _cost(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


class _TrialFailed(Exception):
    """A trial whose technique failed: Optuna records it as FAIL and the search goes on."""


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
