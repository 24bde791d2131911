"""The run's Optuna study, the one state every backend shares: it is opened (or resumed, or joined) here, hands out
trials by ``ask`` (queued policies first), takes their records by ``tell`` (the budget as constraints), counts the
quota and gives the rows back out. A backend only decides where a trial is evaluated (``backend.py``).

* Where it lives: ``study.db`` (SQLite) in the run directory, or a storage URL shared by several processes
  (``storage.py``). The first process to create a shared study stores its measured baseline, budget and search space
  in it and queues the baselines; the others wait for that baseline and adopt it (so a relative budget means the
  same limit everywhere) and never queue them. The storage decides who created the study.
* The quota: ``search.trials`` counts over every process. A trial asked for past the total (concurrent askers) is
  given back at once, failed and marked ``surplus``, and left out of every table. Ranks come from the storage's
  numbering, so concurrent askers never overshoot however their asks interleave.
* A trial's record is stored whole, as one JSON user attribute (:data:`RECORD_ATTR`): one storage write instead of
  one per field. Studies written before that (one attribute per field) read the same (:func:`record_of`).
* Trials left RUNNING by a session that ended (killed) are failed and marked ``interrupted`` on resume, and queued
  again. Optuna's heartbeat (``fail_stale_trials``) does not serve here: heartbeats are recorded only by
  ``study.optimize``'s own thread, not for ask/tell, and a journal storage has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from autocompress.config import measured_baselines
from autocompress.errors import InputError
from autocompress.builtins import LATENCY
from autocompress.rundir import RECORD_ATTR, STUDY_NAME, RunDir, record_of, rows_from_study
from autocompress.runner import Baseline, RunContext, TrialReport, parse_progress
from autocompress.search.constraints import set_budget_constraints
from autocompress.search.early_stopping import MedianRule, resolve_pruner
from autocompress.search.samplers import make_pruner, make_sampler
from autocompress.search.storage import interrupt_safe, local_storage, open_storage, study_user_attrs

__all__ = ["STUDY_NAME", "RECORD_ATTR", "SearchStudy", "open_study", "record_of", "rows_from_study",
           "counted_trials", "quota_reached", "is_surplus", "study_started", "shared_baseline", "worker_id"]

#: what an enqueued trial carries into its record: the baseline's label, where it came from, the solver's label
QUEUED_ATTRS = ("baseline", "origin", "seed")
JOIN_WAIT_S = 120.0  # how long a process joining a shared study waits for its creator to store the baseline


# --- reading trials back -------------------------------------------------------------------------------------------


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that count towards the total, in number order: all but those cut short by a dead or
    interrupted session (they run again under a new number) and those given back as surplus."""
    return [t for t in study.get_trials(deepcopy=False)
            if not t.user_attrs.get("interrupted") and not t.user_attrs.get("surplus")]


def quota_reached(study: optuna.Study, total: int) -> bool:
    """True when ``total`` trials exist and none of them still waits in the queue to be run."""
    counted = counted_trials(study)
    return len(counted) >= total and not any(t.state == TrialState.WAITING for t in counted[:total])


def is_surplus(study: optuna.Study, number: int, total: int) -> bool:
    """Whether trial ``number`` (just asked for) ranks past the total among the counted trials."""
    return sum(1 for t in counted_trials(study) if t.number < number) >= total


def _cost(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


# --- the study ---------------------------------------------------------------------------------------------------------


class SearchStudy:
    """The run's study as the backends use it: :meth:`ask`, evaluate, :meth:`tell`, until :meth:`quota_reached`.

    ``on_trial`` hears every told record (the progress bar and the ``autocompress_trial_completed`` hook).
    """

    def __init__(self, study: optuna.Study, run: RunContext, shared: bool = False,
                 on_trial: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.optuna = study
        self.run = run
        self.shared = shared  # other processes work on it too
        self.total = run.config.search.trials
        self.on_trial = on_trial
        self._single = len(study.directions) == 1
        self._distributions = {d.name: CategoricalDistribution(list(d.choices)) for d in run.space.dimensions}

    def quota_reached(self) -> bool:
        return quota_reached(self.optuna, self.total)

    def running(self) -> bool:
        """Whether a counted trial is still being evaluated (here or in another process)."""
        return any(t.state == TrialState.RUNNING for t in counted_trials(self.optuna))

    def finished(self) -> int:
        """Counted trials already finished (a resumed or joined study's progress so far)."""
        return sum(t.state.is_finished() for t in counted_trials(self.optuna))

    def ask(self) -> optuna.Trial | None:
        """The next trial (queued policies first) with every parameter drawn, or None when it ranks past the total
        (another process asked first): then it is given back, failed and marked ``surplus``."""
        trial = self.optuna.ask(self._distributions)
        if is_surplus(self.optuna, trial.number, self.total):
            trial.set_user_attr("surplus", True)
            self.optuna.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def report_for(self, trial: optuna.Trial) -> TrialReport | None:
        """How the trial's intermediate scores reach the early-stopping rule (see ``early_stopping.py``)."""
        search = self.run.config.search
        pruner = resolve_pruner(search.objective, search.pruner)
        if pruner == "none":
            return None
        if self._single:
            def decide(step: int, value: float, cost: float) -> str | None:
                trial.report(value, step)
                return f"{pruner} pruner" if trial.should_prune() else None
        else:
            rule, metric, study = MedianRule(), self.run.budget.metric, self.optuna

            def decide(step: int, value: float, cost: float) -> str | None:
                done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                records = [record_of(t) for t in done]
                finished = [(parse_progress(r.get("progress")), _cost(r.get(metric))) for r in records]
                return rule.reason_to_stop(step, value, cost, finished)
        return TrialReport(decide)

    def tell(self, trial: optuna.Trial, record: dict[str, Any]) -> None:
        """Finish ``trial`` with its record: the queue's labels added, the record stored whole, the budget as
        constraints and accuracy (and the budgeted cost) as values; then queue what it unlocks and tell
        :attr:`on_trial`."""
        for key in QUEUED_ATTRS:
            if not record.get(key):
                record[key] = trial.user_attrs.get(key, "")
        record["origin"] = record["origin"] or "sampler"
        if self.shared and not record.get("node"):
            record["node"] = worker_id()
        trial.set_user_attr(RECORD_ATTR, {k: _plain(v) for k, v in record.items() if k not in ("number", "state")})
        if record["state"] in ("FAIL", "PRUNED"):
            self.optuna.tell(trial, state=TrialState[record["state"]])
        else:
            measured = {k: math.nan if v is None else v for k, v in record.items()}  # JSON null: not measured
            self.optuna.tell(trial, set_budget_constraints(trial, measured, self.run, self._single))
        if not self.quota_reached():
            enqueue_composed(self.optuna, self.run)
            enqueue_second_wave(self.optuna, self.run)
        if self.on_trial is not None:
            self.on_trial(record)

    def interrupt(self, trial: optuna.Trial, why: str) -> None:
        """Close a trial cut short in this process: failed and marked interrupted, so it is not counted and runs
        again on resume."""
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("error", why)
        self.optuna.tell(trial, state=TrialState.FAIL)

    def close_running(self, why: str = "interrupted (process ended during the trial)") -> None:
        """Close the trials left RUNNING by a session that ended (killed, or stopped by Ctrl-C between two steps).
        Only for a study that no other process is running trials of."""
        for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # Optuna has no public way to write to a trial another session left behind but through its storage id
            self.interrupt(optuna.trial.Trial(self.optuna, t._trial_id), why)

    def requeue_interrupted(self) -> None:
        """Queue again the trials cut short by an earlier session: those it left RUNNING (closed here) and those
        stopped by Ctrl-C. Each once: the numbers queued again are kept in the study's ``requeued`` attribute."""
        self.close_running()
        study = self.optuna
        done = set(study.user_attrs.get("requeued", []))
        cut = [t for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in done]
        if cut:
            study.set_user_attr("requeued", sorted(done | {t.number for t in cut}))
        for t in cut:
            # killed while its parameters were being drawn, an enqueued trial still has them all in fixed_params
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}
            study.enqueue_trial(params, user_attrs={k: v for k, v in t.user_attrs.items() if k in QUEUED_ATTRS})

    def wait_for_running(self, log: Callable[[str], None], poll_s: float = 1.0) -> None:
        """Wait for the trials other processes are still running, at most twice the longest trial so far plus a
        minute (a process that died never finishes its trial; the rows then leave it out)."""
        durations = [record_of(t).get("duration_s") for t in counted_trials(self.optuna)]
        longest = max((d for d in durations if isinstance(d, (int, float))), default=60.0)
        deadline = time.monotonic() + 60.0 + 2 * longest
        said = False
        while True:
            running = [t.number for t in counted_trials(self.optuna) if t.state == TrialState.RUNNING]
            if not running:
                return
            if time.monotonic() > deadline:
                log(f"trials {running} are still running elsewhere; they are left out here (their worker writes "
                    "them, or --resume runs them again once no worker is alive)")
                return
            if not said:
                log(f"waiting for {len(running)} trial(s) running in other workers ...")
                said = True
            time.sleep(poll_s)

    def rows(self) -> list[dict[str, Any]]:
        return rows_from_study(self.optuna)


def _plain(value: Any) -> Any:
    """A record value as JSON: numpy scalars (a plugin's numbers) as Python numbers, NaN (not measured) as null."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


# --- opening ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_study(run: RunContext, run_dir: Path, resume: bool, storage: str | None = None, parallel: bool = False,
               log: Callable[[str], None] = print,
               on_trial: Callable[[dict[str, Any]], None] | None = None) -> Iterator[SearchStudy]:
    """The run's study, in ``run_dir/study.db`` or, given a ``storage`` URL, shared with other processes; its
    storage is closed when the block ends. ``parallel``: this process runs several trials at once."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = local_storage(RunDir(run_dir).study) if storage is None else interrupt_safe(open_storage(storage))
    try:
        if storage is None:
            study = _open_own(run, opened, resume, parallel)
        else:
            study = _join(run, opened, storage, resume, log)
        yield SearchStudy(study, run, shared=storage is not None, on_trial=on_trial)
    finally:
        opened.close()


def _directions(run: RunContext) -> list[str]:
    return ["maximize"] if run.config.search.objective == "single" else ["maximize", "minimize"]


def _open_own(run: RunContext, storage: optuna.storages.BaseStorage, resume: bool, parallel: bool) -> optuna.Study:
    search = run.config.search
    try:
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=_directions(run),
                                    sampler=make_sampler(search, parallel=parallel), pruner=make_pruner(search),
                                    load_if_exists=resume)
    except optuna.exceptions.DuplicatedStudyError:
        raise InputError("out", f"the run directory already holds a study {STUDY_NAME!r}; pass --resume") from None
    if len(study.directions) != len(_directions(run)):
        was = "single" if len(study.directions) == 1 else "multi"
        raise InputError("search.objective", f"the run being resumed was searched with objective {was!r}")
    if not study.trials:
        _start(study, run)
        return study
    # A fresh sampler with the run's seed would replay the random draws of the first session and repeat its
    # policies; offsetting the seed by the trials so far keeps a resumed run reproducible without repeats.
    study.sampler = make_sampler(search, seed=search.seed + len(study.trials), parallel=parallel)
    SearchStudy(study, run).requeue_interrupted()
    return study


def _join(run: RunContext, storage: optuna.storages.BaseStorage, url: str, resume: bool,
          log: Callable[[str], None]) -> optuna.Study:
    """Create the shared study in ``storage`` (opened from ``url``) or join it."""
    search = run.config.search
    # every worker draws its own random numbers, or all would propose the same first policies
    seed = int(hashlib.sha256(f"{search.seed}:{worker_id()}".encode()).hexdigest()[:8], 16)
    sampler = make_sampler(search, seed=seed, parallel=True)
    try:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler,
                                    pruner=make_pruner(search), directions=_directions(run))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=make_pruner(search))
        created = False
    if len(study.directions) != len(_directions(run)):
        raise InputError("search.objective", f"differs from the shared study's in {url}")
    if created:
        _start(study, run)
        log(f"created the shared study {STUDY_NAME!r} in {url}")
        return study
    attrs = _wait_for_baseline(study, url)
    if attrs.get("budget") != str(run.budget):
        raise InputError("budget", f"{run.budget} differs from the shared study's {attrs.get('budget')} in {url}")
    if attrs.get("space") != space_fingerprint(run):
        raise InputError("space", f"the search space differs from the shared study's in {url}")
    run.baseline = Baseline.from_dict(attrs["baseline"])
    if resume:  # the caller vouches that no other worker is alive: their RUNNING trials are dead
        SearchStudy(study, run).requeue_interrupted()
    log(f"joined the shared study {STUDY_NAME!r} in {url} ({len(counted_trials(study))} trials so far)")
    return study


def _start(study: optuna.Study, run: RunContext) -> None:
    """A new study records the run's budget and space, queues the baselines, and records the baseline last:
    processes joining a shared study wait for it, then find the queue."""
    study.set_user_attr("budget", str(run.budget))
    study.set_user_attr("limit", run.limit)
    study.set_user_attr("space", space_fingerprint(run))
    enqueue_baselines(study, run)
    study.set_user_attr("baseline", run.baseline.to_dict())


def _wait_for_baseline(study: optuna.Study, url: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        attrs = study.user_attrs
        if "baseline" in attrs:
            return attrs
        if time.monotonic() > deadline:
            raise InputError("--storage", f"the study in {url} has no baseline after {JOIN_WAIT_S:g} s (its creator "
                             "died while setting it up?); remove the study or use another storage")
        time.sleep(0.5)


def worker_id() -> str:
    """Which process ran a trial (the ``node`` column of a shared-storage run)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def space_fingerprint(run: RunContext) -> str:
    """Workers must search the same space; a short hash of its parameters and choices says whether they do."""
    text = repr([(d.name, tuple(d.choices)) for d in run.space.dimensions])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_started(run_dir: Path, storage: str | None) -> bool:
    """Whether the run's study already exists with its first trials queued (a resumed run, or a shared study another
    process created): then nothing is planned again."""
    if storage is not None:
        return "baseline" in (study_user_attrs(storage, STUDY_NAME) or {})
    if not (RunDir(run_dir).study).is_file():
        return False
    local = local_storage(RunDir(run_dir).study)
    try:
        return "baseline" in optuna.load_study(study_name=STUDY_NAME, storage=local).user_attrs
    except KeyError:
        return False
    finally:
        local.close()


def shared_baseline(storage: str) -> dict[str, Any] | None:
    """The baseline the creator of the shared study in ``storage`` measured, or None before there is one."""
    base = (study_user_attrs(storage, STUDY_NAME) or {}).get("baseline")
    return Baseline.from_dict(base).to_dict() if isinstance(base, dict) else None


# --- what the study runs first, and what finished trials unlock -------------------------------------------------------


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
        record = record_of(t)
        cost = _cost(record.get(metric))
        if not math.isfinite(cost) and run.budget.cost is LATENCY:  # skipped on its prediction (the latency table)
            cost = _cost(record.get("predicted_latency_ms"))
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
        record = record_of(t)
        cost = _cost(record.get(metric))
        # the solver predicts latency from the table; any other cost it computes from the realised structure
        predicted = _cost(record.get("predicted_latency_ms")) if run.budget.cost is LATENCY else cost
        measured.append((predicted, cost))
    study.set_user_attr("solver_waves", done + 1)
    queued = second_wave(solver, measured, wave=done + 2)
    for seed in queued:
        study.enqueue_trial(seed.params, user_attrs={"origin": "solver", "seed": seed.label})
    return len(queued)
