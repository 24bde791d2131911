"""Run the Optuna backend with a progress bar and return the trial rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from autocompress.errors import SearchInterrupted
from autocompress.runner import RunContext
from autocompress.search.optuna_backend import STUDY_NAME, mark_interrupted, run_optuna


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
    storage = f"sqlite:///{run_dir / 'study.db'}"
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

    try:
        study = run_optuna(run, storage, resume, on_trial=on_trial)
    except KeyboardInterrupt as interrupt:  # the storage holds every finished trial; hand them back to be saved
        import optuna

        bar.close()
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
            mark_interrupted(study, "interrupted (Ctrl-C)")  # this process alone runs the study's trials
            rows = rows_from_study(study)
        except Exception:  # stopped before the study existed: nothing finished, nothing to save
            raise interrupt from None
        raise SearchInterrupted(rows) from None
    finally:
        bar.close()
    return rows_from_study(study)


def rows_from_study(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("interrupted") or t.user_attrs.get("surplus") or t.state.name in ("RUNNING", "WAITING"):
            continue
        row = {k: v for k, v in t.user_attrs.items() if k not in ("interrupted",)}
        row["number"] = t.number
        row["state"] = t.state.name
        for key in ("val_accuracy", "latency_ms", "memory_mb"):
            if row.get(key) is None:
                row[key] = math.nan
        row.update(t.params)
        rows.append(row)
    return rows
