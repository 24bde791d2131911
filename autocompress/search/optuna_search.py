"""Run the Optuna backend with a progress bar and return the trial rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import optuna
from tqdm.auto import tqdm

from autocompress.errors import SearchInterrupted
from autocompress.rundir import STUDY_NAME, RunDir, rows_from_study
from autocompress.runner import RunContext
from autocompress.search.optuna_backend import mark_interrupted, run_optuna
from autocompress.search.storage import ctrl_c_in_trials_only, local_storage


def run(
    run: RunContext,
    run_dir: Path,
    resume: bool,
    progress: bool = True,
    log: Callable[[str], None] = print,
    storage: str | None = None,
) -> list[dict[str, Any]]:
    if storage is not None:  # a storage named by the user is shared with other workers (shared_study.py)
        from autocompress.search.shared_study import run_shared

        return run_shared(run, run_dir, resume, progress=progress, log=log, storage=storage)
    total = run.config.search.trials
    bar = tqdm(total=total, desc="search", unit="trial", disable=not progress, dynamic_ncols=True)
    best = [math.nan]

    def on_trial(record: dict[str, Any]) -> None:
        acc = record.get("val_accuracy")
        if record.get("feasible") and acc is not None and not (isinstance(acc, float) and math.isnan(acc)):
            best[0] = acc if math.isnan(best[0]) else max(best[0], acc)
        bar.update(1)
        bar.set_postfix(best_feasible_acc="-" if math.isnan(best[0]) else f"{best[0]:.4f}",
                        last=record.get("state", "") + (" (over budget)" if record.get("skipped") else ""))
        try:
            run.plugins.manager.hook.autocompress_trial_completed(record=dict(record))
        except Exception as exc:  # a listener's bug must not fail the trial
            log(f"warning: autocompress_trial_completed hook failed: {type(exc).__name__}: {exc}")

    # One storage for the whole run, closed once at the end, after the interrupted path has read it too.
    storage = local_storage(RunDir(run_dir).study)
    try:
        try:
            with ctrl_c_in_trials_only():
                study = run_optuna(run, storage, resume, on_trial=on_trial)
            return rows_from_study(study)
        except KeyboardInterrupt:
            bar.close()
        # the storage holds every finished trial; hand them back to be saved
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        except KeyError:  # stopped before the study existed: nothing finished, nothing to save
            raise KeyboardInterrupt from None
        mark_interrupted(study, "interrupted (Ctrl-C)")  # this process alone runs the study's trials
        raise SearchInterrupted(rows_from_study(study)) from None
    finally:
        bar.close()
        storage.close()

