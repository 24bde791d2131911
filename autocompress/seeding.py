"""The solver's first trials: per-layer costs and damages in, the least damaging policies within the budget out.

Before any trial of a search with ``search.strategy: solve`` (the default):

1. **Costs** of every option of every searched layer: latency from the run's per-layer table (profiled on this
   machine, in context: a Linear's time inside a block that keeps two heads is its own entry), memory from the
   option realised on the model (exact).
2. **Damage** of every option alone (:mod:`autocompress.sensitivity`: KL divergence from the uncompressed model on
   the calibration images), scored once per run.
3. **Solve** (:mod:`autocompress.solver`): one option per layer, nested under its block's choice, minimising the summed
   damage with the summed predicted cost within ``fraction x limit``, for each of ``search.solver_fractions``, under
   each combination of the global options (the factorisation method, the pruning criterion). The least damaging
   solution per fraction is a seed: recovery techniques get the strongest setting the space offers (its last listed
   value), since the search will measure what recovery gives back.

The seeds are the first trials after the uncompressed model; the sampler spends the rest around them. Every seed is
measured end to end like any trial, so a prediction that was wrong costs one trial, not the result.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from autocompress.builtins import LATENCY, MEMORY
from autocompress.latency_model.layout import MODEL, Layout, Setting, settings_key
from autocompress.rundir import SENSITIVITY, RunDir
from autocompress.sensitivity import Sensitivity
from autocompress.solver import Option, solve
from autocompress.technique import ApplyContext, Stage

__all__ = ["MAX_GLOBAL_COMBINATIONS", "Plan", "Seed", "Solver", "plan_seeds", "second_wave"]

#: above this many combinations of global options, each non-identity value is solved alone
MAX_GLOBAL_COMBINATIONS = 8

Log = Callable[[str], None]


@dataclass(frozen=True)
class Seed:
    label: str
    params: dict[str, Any]
    fraction: float  # of the limit the solver aimed at
    predicted: float  # the budgeted cost the solver predicted (ms or MB)
    damage: float  # the summed damage of its options


@dataclass
class Plan:
    seeds: list[Seed] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    why_none: str = ""  # when there are no seeds: why
    solver: "Solver | None" = None  # to solve again (second_wave)


def plan_seeds(run: Any, run_dir: Path | None, log: Log = print, progress: bool = False) -> Plan:
    """The solver's seeds for ``run`` (a :class:`autocompress.runner.RunContext`); the damages are kept in
    ``run_dir/sensitivity.json`` and the front in ``run_dir/solver.csv``."""
    plan = Plan()
    space, techniques, costs = run.space, run.techniques, run.budget.costs
    # the solver costs a layer's options with the latency table or the layer's realised bytes: those two alone
    other = [c.name for c in costs if c not in (LATENCY, MEMORY)]
    if other:
        plan.why_none = f"the solver cannot cost {other[0]} layer by layer"
        return plan
    predictor = run.latency_model if LATENCY in costs else None
    if LATENCY in costs:
        if predictor is None:
            plan.why_none = "no latency table for this run"
            return plan
        layout = predictor.layout
    else:
        layout = Layout.of(space, neutral=[d.name for d in space.dimensions if d.layer is None])
    recovery = {d.name: d.choices[-1] for d in space.dimensions
                if d.layer is None and techniques[d.technique].stage == Stage.RECOVERY}
    combos = _global_combinations([d for d in space.dimensions if d.layer is None and d.name not in recovery])
    identities = space.identities
    technique_of = {d.name: d.technique for d in space.dimensions}

    # damages: every option of every layer alone, under the global options of its own techniques
    started = time.perf_counter()
    wanted: dict[str, dict[str, Any]] = {}
    for g in combos:
        for name in layout.layers:
            if name == MODEL:
                continue
            for own in layout.own_settings(name):
                key, params = _damage_key(own, g, technique_of, identities)
                wanted.setdefault(key, params)
        key, params = _damage_key((), g, technique_of, identities, alone=True)
        wanted.setdefault(key, params)
    sens = Sensitivity(
        run.model, run.data.train.images[: max(1, min(run.config.data.calibration_size, len(run.data.train)))],
        lambda params: run.compress(run.policy(params), seed=run.config.search.seed),
        path=None if run_dir is None else RunDir(run_dir).sensitivity,
        fingerprint={"space": sorted(wanted), "calibration_size": run.config.data.calibration_size},
        identities=identities, method=run.config.search.sensitivity, seconds=run.config.search.sensitivity_seconds,
        log=log,
    )
    failed: list[str] = []
    damage = sens.measure(wanted.items(), progress=progress, on_error=lambda key, exc: failed.append(key))
    plan.phases["sensitivity"] = time.perf_counter() - started
    reused = len([k for k in wanted if k]) - sens.measured  # the identity ("") is never scored
    why = f": {sens.why}" if sens.why else ""  # the Fisher choice logged its reason when it was made
    log(f"sensitivity: {len(wanted)} settings, {sens.measured} scored in {sens.seconds:.1f} s"
        + (f" ({sens.by_fisher} by the Fisher estimate, the rest by KL; {len(sens.images)} images)"
           if sens.chosen == "fisher" else f" (KL, {len(sens.images)} images{why})")
        + (f", {reused} from {SENSITIVITY}" if reused > 0 else "")
        + (f"; {len(failed)} could not be applied (never chosen)" if failed else ""))

    # costs and the solve, for each global combination and fraction
    started = time.perf_counter()
    costs = [_Costs(run, layout, predictor if c is LATENCY else None, identities) for c in run.budget.costs]
    problems = []
    for g in combos:
        context = tuple((p, v) for p, v in g if p in {k.param for k in layout.layers[MODEL].knobs})
        options, settings_of = [], []
        for root in layout.roots:
            _add_options(layout, root, None, context, g, options, settings_of, costs, damage, technique_of,
                         identities)
        fixed = tuple(c.fixed(context) for c in costs)
        global_damage = damage[_damage_key((), g, technique_of, identities, alone=True)[0]]
        problems.append((g, options, settings_of, fixed, global_damage))
    plan.solver = Solver(run, problems, identities, recovery, run_dir=run_dir, log=log)
    seeds = plan.solver.seeds(run.config.search.solver_fractions, log=log)
    if not seeds and LATENCY in run.budget.costs:
        seeds, plan.why_none = _near_the_floor(plan.solver, run, log)
    plan.phases["solve"] = time.perf_counter() - started
    if not seeds:
        plan.why_none = plan.why_none or "no policy is predicted within the budget"
    plan.seeds = seeds
    plan.solver.write(run_dir)
    return plan


#: when nothing is predicted within the latency limit: seeds at these fractions of limit x latency_model_margin
NEAR_THE_FLOOR = (0.95, 1.0)


def _near_the_floor(solver: "Solver", run: Any, log: Log) -> tuple[list[Seed], str]:
    """Nothing is predicted within the latency limit: say how fast the space can get on this CPU, and seed the
    least damaging policies predicted within the margin the search measures anyway (``latency_model_margin``): the
    table errs by a few percent either way, so near the floor the measurement decides. Seen on a Xeon with AMX
    (the demo at 0.5x): the fastest policies were predicted at 0.51-0.53x and one measured 0.49x."""
    from autocompress.config import latency_model_margin
    from autocompress.cpu import cpu_info

    base, limit = run.baseline.cost(LATENCY.column), run.limits[LATENCY.column]
    floor = solver.fastest()
    if floor is None:
        return [], ""
    log(f"solver: the fastest policy of this space is predicted at {floor:.2f} ms ({floor / base:.2f}x the "
        f"uncompressed model) on this CPU ({cpu_info().label}); the budget asks for {limit:.2f} ms "
        f"({limit / base:.2f}x)")
    margin = latency_model_margin(run.config.search)
    why = (f"the fastest policy is predicted at {floor / base:.2f}x the uncompressed latency, over the budget's "
           f"{limit / base:.2f}x")
    if margin <= 1.0 or floor > margin * limit:
        return [], why + (f" by more than the latency model's margin ({margin:g})" if margin > 1.0 else "")
    seeds = solver.seeds(list(NEAR_THE_FLOOR), scale=1.0 / margin, log=log,
                         label=f" x margin {margin:g} (nothing predicted within the limit)")
    return seeds, "" if seeds else why


class Solver:
    """The per-layer problems of one run, solved again on demand: the first seeds, and later a second wave with the
    limit corrected by what the first seeds measured (the table's error on this run's policies) and the policies
    already tried excluded, so it proposes the next best ones."""

    def __init__(self, run: Any, problems: list, identities: Mapping[str, Any], recovery: Mapping[str, Any],
                 run_dir: Path | None = None, log: Log = print) -> None:
        self.run, self.problems, self.identities, self.recovery = run, problems, dict(identities), dict(recovery)
        self.run_dir, self.log = run_dir, log
        self.solutions: dict[int, list[list[int]]] = {}  # problem index -> solutions handed out
        self.all: list[Seed] = []
        self.last_winner = 0  # the problem whose solution was handed out last: solved first next time

    def seeds(self, fractions: list[float], scale: float = 1.0, log: Log | None = None, label: str = "") -> list[Seed]:
        """One seed per fraction of ``limit / scale`` (the least damaging solution of any global combination), none
        that was handed out before."""
        run = self.run
        log = log or self.log
        out: list[Seed] = []
        for fraction in fractions:
            best = None
            # the problem that won last is solved first and its damage cuts off every other problem's search (exact:
            # a problem that could beat it is still solved to its optimum); measured in bench/overhead.py
            for index in sorted(range(len(self.problems)), key=lambda i: (i != self.last_winner, i)):
                g, options, settings_of, fixed, global_damage = self.problems[index]
                if not math.isfinite(global_damage):
                    continue
                # the scale corrects the latency table's error; bytes are exact
                limits = tuple(fraction * limit / (scale if metric == LATENCY.column else 1.0)
                               for metric, limit in run.limits.items())
                cutoff = None if best is None else best[0] - global_damage
                chosen = solve(options, limits, fixed, exclude=self.solutions.get(index, []), cutoff=cutoff)
                if chosen is None:
                    continue
                total = global_damage + sum(options[i].damage for i in chosen)
                if best is None or (total, index) < (best[0], best[2]):  # ties: the lower index, as before
                    best = (total, fixed[0] + sum(options[i].costs[0] for i in chosen), index, chosen, g, settings_of)
            if best is None:
                log(f"solver: nothing predicted within {fraction:g} x the limit{label}")
                continue
            total, cost, index, chosen, g, settings_of = best
            self.last_winner = index
            self.solutions.setdefault(index, []).append(chosen)
            params = dict(self.identities)
            params.update(dict(g))
            for i in chosen:
                params.update(dict(settings_of[i]))
            if any(params[k] != self.identities[k] for k in params if k not in self.recovery):
                params.update(self.recovery)  # something was compressed: train it back
            if any(params == seed.params for seed in self.all):
                continue
            seed = Seed(f"solver {fraction:g}x limit{label}", params, fraction, cost, total)
            out.append(seed)
            self.all.append(seed)
        unit, base = run.budget.cost.unit, run.baseline.cost(run.budget.metric)
        for seed in out:
            log(f"{seed.label}: predicted {seed.predicted:.2f} {unit} ({seed.predicted / base:.2f}x), damage "
                f"{seed.damage:.4f}: {run.policy(seed.params).summary()}")
        return out

    def fastest(self) -> float | None:
        """The least latency (ms) the table predicts for any policy of the space, whatever its damage and its
        other costs; None without a latency limit."""
        metrics = list(self.run.limits)
        if LATENCY.column not in metrics:
            return None
        k = metrics.index(LATENCY.column)
        best = None
        for _, options, _, fixed, global_damage in self.problems:
            if not math.isfinite(global_damage):
                continue
            by_latency = [replace(o, damage=o.costs[k]) for o in options]
            chosen = solve(by_latency, [math.inf] * len(metrics), fixed)
            if chosen is not None:
                total = fixed[k] + sum(options[i].costs[k] for i in chosen)
                best = total if best is None else min(best, total)
        return best

    def write(self, run_dir: Path | None = None) -> None:
        run_dir = run_dir or self.run_dir
        if run_dir is None:
            return
        import pandas as pd

        metric = self.run.budget.metric
        RunDir(run_dir).write_solver(pd.DataFrame(
            [{"label": s.label, "fraction": s.fraction, f"predicted_{metric}": s.predicted, "damage": s.damage,
              "policy": self.run.policy(s.params).summary()} for s in self.all],
            columns=["label", "fraction", f"predicted_{metric}", "damage", "policy"]))


#: each later wave: solved at these fractions of the corrected limit once the seeds before it are measured
SECOND_WAVE = (0.95, 1.0)


def second_wave(solver: Solver, measured: list[tuple[float, float]], wave: int = 2) -> list[Seed]:
    """Seeds solved again once the first ones are measured: ``measured`` holds (predicted, measured) costs of the
    first seeds; the limit is divided by their median ratio (a table that over-predicts by 5% leaves 5% of the
    budget unused), and the policies already tried are excluded."""
    import statistics

    ratios = [m / p for p, m in measured if p > 0 and math.isfinite(m) and math.isfinite(p)]
    scale = statistics.median(ratios) if ratios else 1.0
    scale = min(1.25, max(0.8, scale))  # a correction, not a new budget
    if solver.run.budget.cost is LATENCY:
        solver.run.latency_correction = scale  # the same correction decides which candidates are skipped unmeasured
    seeds = solver.seeds(list(SECOND_WAVE), scale=scale, label=f", wave {wave}, limit corrected x{scale:.3f}")
    solver.write()
    return seeds


def _global_combinations(dims: list[Any]) -> list[tuple[Setting, ...]]:
    """Non-identity global settings to solve under: every combination when there are few, else each alone."""
    n = 1
    for d in dims:
        n *= len(d.choices)
    if n <= MAX_GLOBAL_COMBINATIONS:
        combos = [tuple((d.name, v) for d, v in zip(dims, values) if v != d.identity)
                  for values in itertools.product(*(d.choices for d in dims))]
    else:
        combos = [()] + [((d.name, v),) for d in dims for v in d.choices if v != d.identity]
    return combos


def _damage_key(own: tuple[Setting, ...], g: tuple[Setting, ...], technique_of: Mapping[str, str],
                identities: Mapping[str, Any], alone: bool = False) -> tuple[str, dict[str, Any]]:
    """The settings a damage is scored with: ``own`` plus the global options of the techniques ``own`` uses (all of
    ``g`` with ``alone``: the global options' own damage); the empty key is the uncompressed model."""
    used = {technique_of[p] for p, _ in own}
    settings = tuple(own) + tuple((p, v) for p, v in g if alone or technique_of[p] in used)
    if not own and not alone:
        settings = ()
    params = dict(identities)
    params.update(dict(settings))
    return settings_key(settings), params


def _add_options(layout: Layout, name: str, parent: int | None, context: tuple[Setting, ...], g: tuple[Setting, ...],
                 options: list[Option], settings_of: list[tuple[Setting, ...]], costs: list["_Costs"],
                 damage: Mapping[str, float], technique_of: Mapping[str, str], identities: Mapping[str, Any]) -> None:
    children = layout.children(name)
    removed = False
    for own in layout.own_settings(name):  # the identity () first
        settings = context + own
        try:
            cost = tuple(c.layer(name, settings) - sum(c.layer(child, settings) for child in children) for c in costs)
        except _NoCost:
            continue  # not profiled or not realisable: never chosen
        if not own:
            # costs nothing as it is: removed by its context (a Linear of a pruned-away attention), so its other
            # settings would realise the same model; offering them would only let the seeds differ in name
            removed = parent is not None and all(v == 0.0 for v in cost) and not children
        elif removed:
            continue
        d = damage[_damage_key(own, g, technique_of, identities)[0]]
        if not math.isfinite(d):
            continue
        index = len(options)
        options.append(Option(name, settings_key(own), parent, d, cost))
        settings_of.append(own)
        for child in children:
            _add_options(layout, child, index, settings, g, options, settings_of, costs, damage, technique_of,
                         identities)


class _NoCost(Exception):
    pass


class _Costs:
    """The budgeted cost of one searched layer under settings: predicted ms from the table, or MB realised."""

    def __init__(self, run: Any, layout: Layout, predictor: Any, identities: Mapping[str, Any]) -> None:
        self.run, self.layout, self.predictor, self.identities = run, layout, predictor, identities
        self._memory: dict[str, float] = {}

    def layer(self, name: str, settings: tuple[Setting, ...]) -> float:
        if self.predictor is not None:
            from autocompress.latency_model import LatencyModelError

            try:
                return self.predictor.layer_ms(name, settings)
            except LatencyModelError:
                raise _NoCost from None
        return self._layer_mb(name, settings)

    def fixed(self, context: tuple[Setting, ...]) -> float:
        """What no searched layer covers: the residual time, or the bytes outside every searched layer."""
        if self.predictor is not None:
            return self.predictor.residual_under(context)
        from autocompress.costs import memory_mb

        return memory_mb(self.run.model) - sum(self._layer_mb(root, ()) for root in self.layout.roots)

    def _layer_mb(self, name: str, settings: tuple[Setting, ...]) -> float:
        # only the settings of this layer and its ancestors matter (memory has no context beyond the block)
        relevant = tuple(s for s in settings if self.layout.layer_of(s[0]) in (*self.layout.layers[name].ancestors, name))
        key = f"{name}|{settings_key(relevant)}"
        if key not in self._memory:
            from autocompress.compose import apply_policy
            from autocompress.costs import memory_mb

            params = dict(self.identities)
            params.update(dict(relevant))
            try:
                model = apply_policy(self.run.model, self.run.policy(params), self.run.techniques,
                                     ApplyContext(structure_only=True))
                try:
                    layer = model.get_submodule(name)
                except AttributeError:  # removed by its block's settings (all heads pruned): it weighs nothing
                    layer = None
                self._memory[key] = 0.0 if layer is None else memory_mb(layer)
            except Exception:  # noqa: BLE001 - a setting that cannot be realised is never chosen
                self._memory[key] = math.nan
        value = self._memory[key]
        if not math.isfinite(value):
            raise _NoCost
        return value
