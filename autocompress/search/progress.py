"""What the driver does with each finished trial, whichever backend ran it: advance the progress bar and tell the
plugins (``autocompress_trial_completed``)."""

from __future__ import annotations

import math
from typing import Any, Callable

from tqdm.auto import tqdm

from autocompress.runner import RunContext


class TrialProgress:
    """A callable taking one trial record; ``close()`` ends the bar. A listener's bug never fails a trial."""

    def __init__(self, run: RunContext, total: int, progress: bool = True, log: Callable[[str], None] = print,
                 done: int = 0, desc: str = "search") -> None:
        self._run = run
        self._log = log
        self._best = math.nan
        self._bar = tqdm(total=total, initial=min(done, total), desc=desc, unit="trial", disable=not progress,
                         dynamic_ncols=True)

    def __call__(self, record: dict[str, Any]) -> None:
        acc = record.get("val_accuracy")
        if record.get("feasible") and isinstance(acc, (int, float)) and math.isfinite(acc):
            self._best = acc if math.isnan(self._best) else max(self._best, acc)
        self._bar.update(1)
        self._bar.set_postfix(best_feasible_acc="-" if math.isnan(self._best) else f"{self._best:.4f}",
                              last=record.get("state", "") + (" (over budget)" if record.get("skipped") else ""))
        try:
            self._run.plugins.manager.hook.autocompress_trial_completed(record=dict(record))
        except Exception as exc:  # noqa: BLE001 - a listener's bug must not fail the trial
            self._log(f"warning: autocompress_trial_completed hook failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._bar.close()
