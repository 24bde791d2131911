"""Choose one option per layer so that the summed damage is least and the summed costs stay within their limits.

This is a multiple-choice knapsack with nesting: a block chooses how many heads and MLP channels it keeps, and each
Linear inside it chooses its format and rank *under* that block's choice (a pruned block has smaller Linears, so
their costs depend on it). Every option is a 0/1 variable; the options of a layer sum to one at the top level, and
to the variable of the parent option they are nested under otherwise, so exactly one path through each block is
chosen. The integer program is solved exactly by HiGHS (``highspy``); nothing here searches by hand.

    options = [Option("blocks.0", "", None, 0.0, (4.0,)), Option("blocks.0", "heads=2", None, 0.02, (3.1,)), ...]
    chosen = solve(options, limits=(20.0,))      # indices into options, or None when nothing fits
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autocompress.errors import AutocompressError

__all__ = ["Option", "SolverError", "solve"]

#: HiGHS stops after this many seconds; the best solution found by then is used (the demo solves in well under 1 s)
TIME_LIMIT_S = 30.0
#: a cutoff is loosened by this much, far above the tie-break and far below any damage that tells options apart,
#: so a choice exactly as good as the cutoff is still returned and the caller's own comparison decides
CUTOFF_SLACK = 1e-6


class SolverError(AutocompressError):
    """The solver is not installed or failed on a well-formed problem."""


@dataclass(frozen=True)
class Option:
    """One choice of one layer: its damage (sensitivity) and its costs, one per budgeted cost.

    ``parent`` is the index (in the list given to :func:`solve`) of the option this one is nested under, or None
    for a top-level layer. ``costs`` are the option's own share only (a block's attention matmuls and norms, not
    the Linears inside it, which have options of their own).
    """

    layer: str
    key: str
    parent: int | None
    damage: float
    costs: tuple[float, ...]


def solve(options: Sequence[Option], limits: Sequence[float], fixed: Sequence[float] | None = None,
          exclude: Sequence[Sequence[int]] = (), cutoff: float | None = None) -> list[int] | None:
    """Indices of the chosen options (one per layer and parent), or None when no choice meets ``limits``.

    ``fixed`` is the cost no option covers (the residual), subtracted from each limit. ``exclude``: solutions (as
    returned) that must not be chosen again, so repeated solves give the next best. Among equally damaging choices
    the cheaper one wins (a tie-break far below any measured damage). ``cutoff``: only a choice whose summed damage
    is below it is wanted (None otherwise): HiGHS then prunes every branch that cannot beat it, which keeps the
    answer exact for a caller comparing several problems and makes the ones that cannot win quick to dismiss.
    """
    try:
        import highspy
    except ImportError:  # pragma: no cover - a dependency; the message says what to install
        raise SolverError("the search's solver needs highspy (pip install highspy)") from None
    if not options:
        return []
    fixed = tuple(fixed or (0.0,) * len(limits))
    n = len(options)
    damage = np.array([float(o.damage) for o in options])
    if not np.isfinite(damage).all():
        raise SolverError("every option needs a finite damage")
    costs = np.array([[float(c) for c in o.costs] for o in options]).reshape(n, len(limits))
    scale = np.where(np.abs(costs).sum(0) > 0, np.abs(costs).sum(0), 1.0)
    tie = 1e-9 * (costs / scale).sum(1)  # prefer the cheaper of two equally damaging options

    h = _quiet(highspy.Highs)
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("time_limit", TIME_LIMIT_S)
    h.addVars(n, np.zeros(n), np.ones(n))
    index = np.arange(n, dtype=np.int32)
    h.changeColsIntegrality(n, index, np.array([highspy.HighsVarType.kInteger] * n))
    h.changeColsCost(n, index, damage + tie)

    slots: dict[tuple[str, int | None], list[int]] = {}
    for i, o in enumerate(options):
        if o.parent is not None and not 0 <= o.parent < n:
            raise SolverError(f"option {i} ({o.layer} {o.key}) is nested under a missing option {o.parent}")
        slots.setdefault((o.layer, o.parent), []).append(i)
    for (_, parent), members in slots.items():
        cols = np.array(members + ([parent] if parent is not None else []), dtype=np.int32)
        vals = np.array([1.0] * len(members) + ([-1.0] if parent is not None else []))
        rhs = 0.0 if parent is not None else 1.0
        h.addRow(rhs, rhs, len(cols), cols, vals)
    for solution in exclude:  # a no-good cut: not all of a previous solution's options together
        cols = np.array(sorted(set(solution)), dtype=np.int32)
        if len(cols):
            h.addRow(-highspy.kHighsInf, float(len(cols) - 1), len(cols), cols, np.ones(len(cols)))
    for k, limit in enumerate(limits):
        if math.isfinite(limit):
            h.addRow(-highspy.kHighsInf, float(limit) - float(fixed[k]), n, index, costs[:, k])
    cut = cutoff is not None and math.isfinite(cutoff)
    if cut:  # as a row: HiGHS's objective_bound option is not a hard cut
        h.addRow(-highspy.kHighsInf, float(cutoff) + CUTOFF_SLACK, n, index, damage + tie)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    solution = h.getSolution()
    if not solution.value_valid:
        if status == highspy.HighsModelStatus.kTimeLimit or cut:  # nothing beats the cutoff
            return None
        raise SolverError(f"HiGHS ended with {status}")
    return [i for i, x in enumerate(solution.col_value) if x > 0.5]


def _quiet(make):
    """``make()`` with the process's stdout closed: HiGHS prints a banner on the first solver it builds."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        return make()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
