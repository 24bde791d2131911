"""Several processes, one study: the Optuna backend on a shared storage (``--storage``, see ``storage.py``).

Every worker runs the same command, on one machine or many:

* The first worker to create the study stores its measured baseline, budget and search space in the study and then
  enqueues the baseline policies; the others find the study, wait for that baseline and adopt it (so a relative
  budget means the same limit everywhere) and never enqueue. The storage decides who created the study.
* Trial numbers come from the storage, which hands each number and each enqueued trial out once.
* ``--trials`` is the total over all workers. After asking for a trial, a worker computes the trial's rank among the
  study's trials; a trial ranked past the total is given back at once (failed and marked ``surplus``, left out of
  every table) and the worker stops. Ranks come from the storage's numbering, so concurrent workers never
  overshoot however their asks interleave.
* A worker that runs out of trials waits for the trials still running elsewhere, so each worker's run directory
  ends with the whole study. A worker that died leaves its trial RUNNING (a journal file has no heartbeat);
  ``--resume``, run when no other worker is alive, fails it and queues it again.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress.errors import InputError, SearchInterrupted
from autocompress.rundir import STUDY_NAME, rows_from_study
from autocompress.runner import Baseline, RunContext
from autocompress.search.optuna_backend import (
    QUEUED_ATTRS, _quiet_failed_trial_warnings, _TrialFailed, enqueue_baselines, enqueue_followups, fail_interrupted,
    make_objective, make_pruner, make_sampler,
)
from autocompress.search.progress import TrialProgress
from autocompress.search.storage import ctrl_c_in_trials_only, interrupt_safe, open_storage

__all__ = ["run_shared", "counted_trials", "quota_reached", "is_surplus", "space_fingerprint"]

JOIN_WAIT_S = 120.0  # how long a joining worker waits for the creator to store the baseline


def worker_id() -> str:
    """Which process ran a trial (the ``node`` column of a shared-storage run)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that count towards the total, in number order: all but those cut short by a dead or
    interrupted worker (they run again under a new number) and those given back as surplus."""
    return [t for t in study.get_trials(deepcopy=False)
            if not t.user_attrs.get("interrupted") and not t.user_attrs.get("surplus")]


def quota_reached(study: optuna.Study, total: int) -> bool:
    """True when ``total`` trials exist and none of them still waits in the queue to be run."""
    counted = counted_trials(study)
    return len(counted) >= total and not any(t.state == TrialState.WAITING for t in counted[:total])


def is_surplus(study: optuna.Study, trial: optuna.Trial, total: int) -> bool:
    """Whether ``trial`` (just asked for) ranks past the total among the counted trials."""
    rank = sum(1 for t in counted_trials(study) if t.number < trial.number)
    return rank >= total


def space_fingerprint(run: RunContext) -> str:
    """Workers must search the same space; a short hash of its parameters and choices says whether they do."""
    text = repr([(d.name, tuple(d.choices)) for d in run.space.dimensions])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def join_study(run: RunContext, storage: optuna.storages.BaseStorage, url: str, resume: bool,
               log: Callable[[str], None] = print, study_name: str = STUDY_NAME) -> tuple[optuna.Study, bool]:
    """Create the shared study in ``storage`` (opened from ``url``) or join it; returns it and whether this worker
    created it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_failed_trial_warnings()
    single = run.config.search.objective == "single"
    # every worker draws its own random numbers, or all would propose the same first policies
    seed = int(hashlib.sha256(f"{run.config.search.seed}:{worker_id()}".encode()).hexdigest()[:8], 16)
    sampler = make_sampler(run.config.search, seed=seed, parallel=True)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                    pruner=make_pruner(run.config.search),
                                    directions=["maximize"] if single else ["maximize", "minimize"])
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                                  pruner=make_pruner(run.config.search))
        created = False
    if len(study.directions) != (1 if single else 2):
        raise InputError("search.objective", f"differs from the shared study's in {url}")
    if created:
        study.set_user_attr("budget", str(run.budget))
        study.set_user_attr("limit", run.limit)
        study.set_user_attr("space", space_fingerprint(run))
        enqueue_baselines(study, run)
        study.set_user_attr("baseline", run.baseline.to_dict())  # last: joiners wait for it, then find the queue
        log(f"created the shared study {study_name!r} in {url}")
        return study, True
    attrs = _wait_for_baseline(study, url)
    if attrs.get("budget") != str(run.budget):
        raise InputError("budget", f"{run.budget} differs from the shared study's {attrs.get('budget')} in {url}")
    if attrs.get("space") != space_fingerprint(run):
        raise InputError("space", f"the search space differs from the shared study's in {url}")
    run.baseline = Baseline.from_dict(attrs["baseline"])
    if resume:  # the caller vouches that no other worker is alive: their RUNNING trials are dead
        for params, user_attrs in fail_interrupted(study):
            study.enqueue_trial(params, user_attrs={k: v for k, v in user_attrs.items() if k in QUEUED_ATTRS})
    log(f"joined the shared study {study_name!r} in {url} ({len(counted_trials(study))} trials so far)")
    return study, False


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


def run_shared(
    run: RunContext,
    run_dir: Path,
    resume: bool,
    progress: bool = True,
    log: Callable[[str], None] = print,
    storage: str = "",
    study_name: str = STUDY_NAME,
) -> list[dict[str, Any]]:
    """One worker of a shared study; returns the rows of the whole study once no trial is running anywhere."""
    opened = interrupt_safe(open_storage(storage))  # closed once, when no call uses it any more
    try:
        return _work_on(run, join_study(run, opened, storage, resume, log, study_name)[0], progress, log)
    finally:
        opened.close()


def _work_on(run: RunContext, study: optuna.Study, progress: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:

    total = run.config.search.trials
    listener = TrialProgress(run, total, progress, log, done=len(counted_trials(study)))
    objective = make_objective(run, study, listener, extra={"node": worker_id()})

    def guarded(trial: optuna.Trial) -> Any:
        if is_surplus(study, trial, total):
            trial.set_user_attr("surplus", True)
            study.stop()
            raise _Surplus(f"trial {trial.number} is past the total of {total}")
        return objective(trial)

    def stop_when_full(study: optuna.Study, _: FrozenTrial) -> None:
        if quota_reached(study, total):
            study.stop()
        else:
            enqueue_followups(study, run)

    try:
        with ctrl_c_in_trials_only():
            if not quota_reached(study, total):
                study.optimize(guarded, n_trials=None, timeout=run.config.search.timeout_s,
                               catch=(_TrialFailed, _Surplus), callbacks=[stop_when_full])
        wait_for_running(study, log)
    except KeyboardInterrupt:
        raise SearchInterrupted(rows_from_study(study)) from None
    finally:
        listener.close()
    return rows_from_study(study)


def wait_for_running(study: optuna.Study, log: Callable[[str], None], poll_s: float = 1.0) -> None:
    """Wait for the trials other workers are still running, at most twice the longest trial so far plus a minute
    (a worker that died never finishes its trial; the rows then leave it out)."""
    counted = counted_trials(study)
    durations = [t.user_attrs.get("duration_s") for t in counted]
    longest = max((d for d in durations if isinstance(d, (int, float))), default=60.0)
    deadline = time.monotonic() + 60.0 + 2 * longest
    said = False
    while True:
        running = [t.number for t in counted_trials(study) if t.state == TrialState.RUNNING]
        if not running:
            return
        if time.monotonic() > deadline:
            log(f"trials {running} are still running elsewhere; they are left out here (their worker writes them, "
                "or --resume runs them again once no worker is alive)")
            return
        if not said:
            log(f"waiting for {len(running)} trial(s) running in other workers ...")
            said = True
        time.sleep(poll_s)


class _Surplus(Exception):
    """A trial asked for after the total was reached: given back (failed, marked surplus) and left out."""
