"""A time bound for one trial (``search.trial_timeout_s``) that works on plain CPU torch code.

Two mechanisms, because a trial runs either in the main thread (the Optuna backend) or in a worker thread (Ray):

* In the main thread of a POSIX process, a one-shot ``SIGALRM`` timer (``signal.setitimer``) raises
  :class:`TrialTimeout` inside the trial when the bound is reached. Python runs signal handlers between bytecodes,
  so a long torch operator finishes first and the trial stops right after it: no plugin cooperation is needed,
  a sleeping or looping plugin is stopped too. The timer is not used when another one is already armed (e.g.
  pytest-timeout), so it never steals someone else's alarm.
* Everywhere (and as the only mechanism off the main thread, where signals cannot be delivered), the deadline is
  kept per thread: long-running techniques call :meth:`autocompress.ApplyContext.check_deadline` (or
  :func:`check_deadline`) between steps, and the runner fails a trial that finished past its bound.

:class:`TrialTimeout` derives from ``BaseException`` (like ``KeyboardInterrupt``) so that a plugin's generic
``except Exception`` cannot swallow it; the runner catches it and records the trial as failed with the reason.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

__all__ = ["TrialTimeout", "check_deadline", "remaining_s", "time_limit"]

_local = threading.local()


class TrialTimeout(BaseException):
    """A trial ran past its time bound. Only that trial fails; the search goes on."""


def _deadline() -> tuple[float, float] | None:
    return getattr(_local, "deadline", None)


def remaining_s() -> float | None:
    """Seconds left to the trial running in this thread, or None when it has no bound."""
    bound = _deadline()
    return None if bound is None else bound[0] - time.monotonic()


def check_deadline() -> None:
    """Raise :class:`TrialTimeout` if the trial running in this thread is past its bound. Cheap; call it often."""
    bound = _deadline()
    if bound is not None and time.monotonic() >= bound[0]:
        raise TrialTimeout(_message(bound[1]))


def _message(seconds: float) -> str:
    return f"exceeded the trial time bound of {seconds:g} s (search.trial_timeout_s)"


def _alarm_usable() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0  # someone else's alarm is armed: leave it alone
    )


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Bound the block to ``seconds`` (None: no bound). Raises :class:`TrialTimeout` when it runs past it."""
    if seconds is None:
        yield
        return
    outer = _deadline()
    _local.deadline = (time.monotonic() + seconds, seconds)
    armed = [False]
    use_alarm = _alarm_usable()
    previous: object = signal.SIG_DFL
    if use_alarm:

        def on_alarm(signum: int, frame: object) -> None:
            if armed[0]:
                armed[0] = False  # raise once, never from the clean-up below
                raise TrialTimeout(_message(seconds))

        previous = signal.signal(signal.SIGALRM, on_alarm)
        if previous is None:  # installed from C: the best we can restore is the default
            previous = signal.SIG_DFL
    try:
        if use_alarm:
            armed[0] = True
            signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        try:
            armed[0] = False
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0.0)
                signal.signal(signal.SIGALRM, previous)
            _local.deadline = outer
