"""The ``optuna`` backend: trials evaluated one after another in this process.

The study (``study.py``) maximizes validation accuracy and minimizes the budgeted cost, with the budget as a
constraint; with ``search.objective: single`` it maximizes accuracy alone (budget still a constraint) so Optuna's
pruners can stop training trials early (``early_stopping.py``). Given a ``storage`` URL the study is shared: several
processes, on one machine or many, run this same backend on it and the quota counts over all of them.

Ctrl-C stops the trial being evaluated at once (it is closed as interrupted and runs again on ``--resume``) and is
held back during storage writes, which it could leave half done (``storage.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from autocompress.runner import RunContext, evaluate_params
from autocompress.search.storage import ctrl_c_in_trials_only, interruptible
from autocompress.search.study import SearchStudy

__all__ = ["OptunaBackend"]


class OptunaBackend:
    name = "optuna"
    parallel = False

    def run(self, run: RunContext, study: SearchStudy, run_dir: Path, resume: bool,
            log: Callable[[str], None], **options: Any) -> None:
        if options:
            raise TypeError(f"the optuna backend takes no options {sorted(options)}")
        timeout = run.config.search.timeout_s
        began = time.monotonic()
        with ctrl_c_in_trials_only():
            while not study.quota_reached() and not (timeout and time.monotonic() - began >= timeout):
                trial = study.ask()
                if trial is None:  # past the total: other processes of a shared study took the rest
                    break
                try:
                    with interruptible():  # the trial's own work; Ctrl-C elsewhere waits for the storage
                        record = evaluate_params(run, dict(trial.params), trial.number, report=study.report_for(trial))
                except KeyboardInterrupt:
                    study.interrupt(trial, "interrupted (Ctrl-C during the trial)")
                    raise
                study.tell(trial, record)
