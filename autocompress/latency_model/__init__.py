"""The latency model: a per-layer lookup table profiled on the target, and a predictor built on it.

Measuring every candidate end to end is exact but slow; FLOPs and bit counts are fast but wrong on real CPUs. The
table holds measured latencies of every layer variant the installed techniques can produce (profiled once per
machine, torch version, model and target, then reused), and the predictor sums a policy's entries plus the measured
residual. The search uses it only to reject candidates that are clearly over a latency budget; every policy that is
evaluated is still measured end to end.

    predictor, stats = build_predictor(model, example, space, plugins, model_name=..., model_kwargs=..., target=...)
    predictor.predict(policy)            # milliseconds
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autocompress.latency_model.layout import Layout
from autocompress.latency_model.predictor import LatencyModelError, LatencyPredictor
from autocompress.latency_model.plan import ProfileStats
from autocompress.latency_model.profiler import profile
from autocompress.latency_model.signatures import structure_signature
from autocompress.latency_model.table import LatencyTable, default_table_path, table_key
from autocompress.latency_model.timing import Timing
from autocompress.runtime import TORCH, Runtime
from autocompress.space import ResolvedSpace
from autocompress.technique import Technique

__all__ = [
    "LatencyModelError", "LatencyPredictor", "LatencyTable", "Layout", "ProfileStats", "Timing",
    "build_predictor", "check_predictor", "default_table_path", "describe", "predictor_for_run", "profile", "table_for",
    "technique_versions",
]

#: above this many combinations of a layer's and its context's knob values, the context is profiled one setting
#: at a time (see Layout.combinations)
MAX_COMBINATIONS = 64


def technique_versions(plugins: Any) -> dict[str, str]:
    """``technique -> "distribution==version"`` of the plugin that registered it: its entries are profiled again
    when that changes."""
    owners = getattr(plugins, "owners", {})
    infos = {info.name: info for info in getattr(plugins, "info", [])}
    out = {}
    for technique, owner in owners.items():
        info = infos.get(owner)
        out[technique] = f"{info.distribution}=={info.version}" if info else owner
    return out


def table_for(
    model: nn.Module, example: torch.Tensor, model_name: str, model_kwargs: dict[str, Any], threads: int,
    path: str | Path | None = None, fresh: bool = False, field: str = "latency table", runtime: Runtime | None = None,
) -> LatencyTable:
    """The table for this model and target (loaded from ``path`` or the cache when it exists, else empty), in
    ``runtime`` (default torch eager)."""
    other = runtime is not None and runtime is not TORCH
    key = table_key(model_name, model_kwargs, structure_signature(model), threads, example.shape[0],
                    tuple(example.shape[1:]), str(example.dtype).replace("torch.", ""),
                    runtime=f"{runtime.name}: {runtime.version()}" if other else None)
    return LatencyTable.open(key, path, fresh=fresh, field=field)


def build_predictor(
    model: nn.Module,
    example: torch.Tensor,
    space: ResolvedSpace,
    plugins: Any,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    threads: int,
    warmup: int = 3,
    repeats: int = 10,
    path: str | Path | None = None,
    force: bool = False,
    progress: bool | None = None,
    max_combinations: int = MAX_COMBINATIONS,
    log: Callable[[str], None] | None = None,
    field: str = "latency table",
    timing: Timing | None = None,
    runtime: Runtime | None = None,
) -> tuple[LatencyPredictor, ProfileStats]:
    """Load or profile the table ``space`` needs, then a predictor over it. ``plugins`` is a
    :class:`~autocompress.pluginmanager.Plugins` (or a plain mapping of technique name to technique). ``runtime``:
    where to time (default torch eager; another runtime profiles whole models, see runtime_profile.py)."""
    techniques: Mapping[str, Technique] = getattr(plugins, "techniques", plugins)
    table = table_for(model, example, model_name, model_kwargs, threads, path, fresh=force, field=field,
                      runtime=runtime)
    stale = table.forget_techniques(technique_versions(plugins))
    if stale and log:
        log(f"latency table: {', '.join(stale)} changed version; its entries are profiled again")
    timing = timing or Timing(threads, warmup, repeats)
    if runtime is not None and runtime is not TORCH:
        from autocompress.latency_model.runtime_profile import profile_in_runtime

        layout, stats = profile_in_runtime(table, model, example, space, techniques, timing, runtime, plugins,
                                           max_combinations=max_combinations, force=force, progress=progress)
    else:
        layout, stats = profile(table, model, example, space, techniques, timing,
                                max_combinations=max_combinations, force=force, progress=progress)
    if log and (stats.measured or stats.failed):
        log(f"latency table {table.path}: {stats.summary()}")
    return LatencyPredictor(table, layout), stats


#: a table whose predicted speed ratios of the probe policies are off by more than this is not trusted
STALE_ERROR = 0.25


def predictor_for_run(
    config: Any, model: nn.Module, example: torch.Tensor, space: ResolvedSpace, plugins: Any, measured_base_ms: float,
    log: Callable[[str], None] = print, progress: bool | None = None, runtime: Runtime | None = None,
) -> LatencyPredictor | None:
    """The predictor a search uses: the config's table (profiled now where entries are missing), checked against
    this machine as it is now, and calibrated to the uncompressed latency measured in this process.

    The check (:func:`check_predictor`) times a few uniform policies against the uncompressed model (twice when the
    first time is off, and the better of the two counts: one check on a loaded machine read 25% off); a table that
    mis-predicts them (profiled on a machine in another state, or a plugin that changed its kernels without changing
    its version) is profiled again, and if it still does not match, the search runs without it. A table that was
    profiled just now (nothing from the cache) and does not match is not profiled a second time: the runtime's
    whole-model table of the demo in ONNX Runtime (Xeon with AMX) mis-predicted rank 0.5 (0.52x, measured 0.85x)
    right after it was made, and a second profile would have cost minutes to time it the same way. A failure to
    profile is reported and the search goes on measuring every candidate; a table file made for another target is an
    input error."""
    from autocompress.errors import InputError

    t = config.target
    path = config.resolve_path(config.search.latency_table) if config.search.latency_table else None
    kwargs = dict(model_name=config.model.name, model_kwargs=config.model.kwargs, threads=t.threads,
                  warmup=t.warmup, repeats=t.repeats, path=path, progress=progress, log=log,
                  field=f"{config.source}.search.latency_table", runtime=runtime)
    techniques = getattr(plugins, "techniques", plugins)
    where = dict(runtime=runtime, plugins=plugins)
    try:
        for attempt in ("cached", "profiled again"):
            predictor, stats = build_predictor(model, example, space, plugins, force=attempt != "cached", **kwargs)
            # entries from an earlier run are checked on a composed policy too; a table profiled just now is not
            # (a second profile would time the same interactions the same way)
            where["composed"] = stats.from_table > 0
            error, detail = check_predictor(predictor, model, example, space, techniques, t.threads, t.warmup, **where)
            if error > STALE_ERROR:  # a second look must agree: on AVX2 emulated bf16 alone varies by 10-20%
                error, detail = min((error, detail), check_predictor(predictor, model, example, space, techniques,
                                                                     t.threads, t.warmup, **where))
            if error <= STALE_ERROR:
                return predictor.calibrated(measured_base_ms)
            log(f"warning: the latency table ({attempt}) does not match this machine now: {detail}")
            if not stats.from_table:  # profiled just now: a second profile would time the same way
                break
    except InputError:
        raise
    except Exception as exc:  # a plugin that cannot be profiled must not stop the search
        log(f"warning: latency model not used ({type(exc).__name__}: {exc}); every candidate is measured")
        return None
    log("warning: latency model not used for this run; every candidate is measured")
    return None


def check_predictor(
    predictor: LatencyPredictor, model: nn.Module, example: torch.Tensor, space: ResolvedSpace,
    techniques: Mapping[str, Technique], threads: int, warmup: int = 2, repeats: int = 7,
    runtime: Runtime | None = None, plugins: Any = None, composed: bool = False,
) -> tuple[float, str]:
    """Largest relative error of the predicted speed ratio (policy / uncompressed) of up to three uniform policies
    (the predicted fastest, slowest and middle one), each timed round by round with the uncompressed model (in
    ``runtime``, default torch eager).

    ``composed``: also the policy that sets every knob at once to its value predicted fastest alone (int8 on a
    low-rank Linear inside a pruned block). Uniform policies read only the table's single-setting entries; the
    solver's policies read its combination entries, and a cached table once passed the uniform check while
    under-predicting the solver's policies by 35-50% (AMD EPYC, AVX2, a host whose speed had changed 2.8x)."""
    from autocompress.compose import apply_policy
    from autocompress.costs import compare_latency, median_ratio
    from autocompress.technique import ApplyContext

    base = float(predictor.table.base_ms)
    predicted = {}
    for label, params in space.uniform_baselines().items():
        try:
            predicted[label] = (predictor.predict(params) / base, params)
        except LatencyModelError:
            continue
    if not predicted:
        return 0.0, "nothing to check"
    ranked = sorted(predicted, key=lambda k: predicted[k][0])
    probes = list(dict.fromkeys([ranked[0], ranked[-1], ranked[len(ranked) // 2]]))
    corner = composed_corner(predictor, space) if composed else None
    if corner is not None:
        label, params = corner
        predicted[label] = (predictor.predict(params) / base, params)
        probes.append(label)
    models = {"uncompressed": model}
    for label in probes:
        models[label] = apply_policy(model, space.policy(predicted[label][1]), techniques,
                                     ApplyContext(structure_only=True))
    if runtime is not None and runtime is not TORCH:
        models = {label: runtime.prepare(m, example, threads, plugins) for label, m in models.items()}
    timed = compare_latency(models, example, threads, warmup, repeats)
    base_samples = timed["uncompressed"].samples_ms
    errors = {}
    for label in probes:
        measured = median_ratio(timed[label].samples_ms, base_samples)
        errors[label] = (abs(predicted[label][0] - measured) / measured, predicted[label][0], measured)
    worst = max(errors, key=lambda k: errors[k][0])
    error, pred, meas = errors[worst]
    return error, f"{worst}: predicted {pred:.2f}x the uncompressed latency, measured {meas:.2f}x"


def composed_corner(predictor: LatencyPredictor, space: ResolvedSpace) -> tuple[str, dict[str, Any]] | None:
    """``("composed: a + b + ...", params)``: every layer knob at its value predicted fastest alone (of those
    faster than the identity), all at once; None when fewer than two knobs have such a value or the table cannot
    predict the result."""
    base = float(predictor.table.base_ms)
    params, parts = space.identities, []
    for (technique, knob), dims in space.layer_knobs().items():
        best = None
        for value in dict.fromkeys(v for d in dims for v in d.choices if v != d.identity):
            try:
                ratio = predictor.predict(space.uniform(technique, knob, value)) / base
            except LatencyModelError:
                continue
            if ratio < 1.0 and (best is None or ratio < best[0]):
                best = (ratio, value)
        if best is not None:
            params.update({d.name: best[1] for d in dims if best[1] in d.choices})
            parts.append(f"{technique}.{knob}={best[1]}")
    if len(parts) < 2:
        return None
    try:
        predictor.predict(params)
    except LatencyModelError:
        return None
    return "composed: " + " + ".join(parts), params


def describe(predictor: LatencyPredictor) -> list[str]:
    """Lines for people: the uncompressed time, the residual, and the median speed ratio of each setting alone."""
    lines = [f"uncompressed model: {predictor.base_ms:.2f} ms end to end; residual (not in any searched layer): "
             f"{predictor.residual_ms:.2f} ms ({100 * predictor.residual_ms / predictor.base_ms:.0f}%)"]
    ratios: dict[str, list[float]] = {}
    for name, entries in predictor.table.entries.items():
        if name not in predictor.layout.layers:
            continue
        for key, entry in entries.items():
            if key and ";" not in key and "ratio" in entry and key.split("=", 1)[0].rpartition(":")[0] == name:
                setting = key.rpartition(":")[2] if name else key
                ratios.setdefault(setting, []).append(float(entry["ratio"]))
    if ratios:
        lines.append("each setting alone, time of its layer relative to uncompressed (median over layers):")
        import statistics

        for setting in sorted(ratios):
            values = ratios[setting]
            lines.append(f"  {setting:<40} {statistics.median(values):6.2f}x  ({len(values)} layers)")
    return lines
