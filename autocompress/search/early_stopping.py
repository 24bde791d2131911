"""Early stopping of trials from their intermediate scores (multi-fidelity search).

A technique that trains (distillation) reports a validation probe after 25, 50, 100, ... steps through
``ctx.report``; the search answers whether the trial should go on. What answers depends on ``search.objective``:

- ``single``: the study maximizes validation accuracy alone and the budget stays a constraint
  (``trial.set_constraint``). Optuna's pruners work there: ``successive_halving`` (what ``auto`` picks),
  ``hyperband`` and ``median``; the probe is passed on with ``trial.report`` and ``trial.should_prune``.
- ``multi`` (the default): accuracy and cost are both objectives, and Optuna's pruners do not support
  multi-objective studies (``Trial.report`` raises). autocompress applies its own rule there, ``median``
  (:class:`MedianRule`, what ``auto`` picks): a trial stops at step s when at least ``min_trials`` completed trials
  that are at most as costly reported a probe at step s and its probe is below their median. Comparing only with
  trials that cost no more keeps the rule from stopping a cheap trial just because costlier ones are more accurate:
  a stopped trial is one that is, so far, dominated by the typical trial that costs no more.

Either way the stopped trial is recorded as PRUNED in ``trials.csv``, with the step, its probe and the reason.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

__all__ = ["MedianRule", "resolve_pruner"]


def resolve_pruner(objective: str, pruner: str) -> str:
    """The rule ``pruner`` names for ``objective``, with ``auto`` made concrete."""
    if pruner != "auto":
        return pruner
    return "successive_halving" if objective == "single" else "median"


@dataclass(frozen=True)
class MedianRule:
    """The multi-objective rule: stop a trial whose probe is below the median of completed trials at most as costly.

    ``cost_tolerance`` widens "at most as costly" by a fraction, because measured latency carries noise.
    """

    min_trials: int = 3
    cost_tolerance: float = 0.05

    def reason_to_stop(
        self, step: int, value: float, cost: float, finished: Iterable[tuple[dict[int, float], float]]
    ) -> str | None:
        """``finished`` holds ``(probe per step, budgeted cost)`` of each completed trial."""
        peers = [
            progress[step] for progress, peer_cost in finished
            if step in progress and _at_most(peer_cost, cost, self.cost_tolerance)
        ]
        if len(peers) < self.min_trials:
            return None
        median = statistics.median(peers)
        if value < median:
            return (f"median rule: below the median {median:.4f} of {len(peers)} completed trials at step {step} "
                    f"that cost no more")
        return None


def _at_most(peer_cost: float | None, cost: float, tolerance: float) -> bool:
    if peer_cost is None or not math.isfinite(peer_cost) or not math.isfinite(cost):
        return True  # a cost not measured does not exclude the peer
    return peer_cost <= cost * (1 + tolerance)
