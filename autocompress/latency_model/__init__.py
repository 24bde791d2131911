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
from autocompress.latency_model.profiler import ProfileStats, Timing, profile, structure_signature
from autocompress.latency_model.table import LatencyTable, default_table_path, table_key
from autocompress.space import ResolvedSpace
from autocompress.technique import Technique

__all__ = [
    "LatencyModelError", "LatencyPredictor", "LatencyTable", "Layout", "ProfileStats", "Timing",
    "build_predictor", "default_table_path", "describe", "predictor_for_run", "profile", "table_for",
    "technique_versions",
]

#: above this many combinations of a layer's and its context's knob values, the context is profiled one setting
#: at a time (see Layout.combinations)
MAX_COMBINATIONS = 64


def technique_versions(plugins: Any) -> dict[str, str]:
    """``technique -> "distribution==version"`` of the plugin that registered it (entries are re-made when it changes)."""
    owners = getattr(plugins, "owners", {})
    infos = {info.name: info for info in getattr(plugins, "info", [])}
    out = {}
    for technique, owner in owners.items():
        info = infos.get(owner)
        out[technique] = f"{info.distribution}=={info.version}" if info else owner
    return out


def table_for(
    model: nn.Module, example: torch.Tensor, model_name: str, model_kwargs: dict[str, Any], threads: int,
    path: str | Path | None = None, fresh: bool = False, field: str = "latency table",
) -> LatencyTable:
    """The table for this model and target (loaded from ``path`` or the cache when it exists, else empty)."""
    key = table_key(model_name, model_kwargs, structure_signature(model), threads, example.shape[0],
                    tuple(example.shape[1:]), str(example.dtype).replace("torch.", ""))
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
) -> tuple[LatencyPredictor, ProfileStats]:
    """Load or profile the table ``space`` needs, then a predictor over it. ``plugins`` is a
    :class:`~autocompress.pluginmanager.Plugins` (or a plain mapping of technique name to technique)."""
    techniques: Mapping[str, Technique] = getattr(plugins, "techniques", plugins)
    table = table_for(model, example, model_name, model_kwargs, threads, path, fresh=force, field=field)
    stale = table.forget_techniques(technique_versions(plugins))
    if stale and log:
        log(f"latency table: {', '.join(stale)} changed version; its entries are profiled again")
    layout, stats = profile(table, model, example, space, techniques, timing or Timing(threads, warmup, repeats),
                            max_combinations=max_combinations, force=force, progress=progress)
    if log and (stats.measured or stats.failed):
        log(f"latency table {table.path}: {stats.summary()}")
    return LatencyPredictor(table, layout), stats


def predictor_for_run(
    config: Any, model: nn.Module, example: torch.Tensor, space: ResolvedSpace, plugins: Any, measured_base_ms: float,
    log: Callable[[str], None] = print, progress: bool | None = None,
) -> LatencyPredictor | None:
    """The predictor a search uses: the config's table (profiled now where entries are missing), calibrated to the
    uncompressed latency measured in this process. A failure to profile is reported and the search goes on
    measuring every candidate; a table file made for another target is an input error."""
    from autocompress.errors import InputError

    t = config.target
    path = config.resolve_path(config.search.latency_table) if config.search.latency_table else None
    try:
        predictor, _ = build_predictor(
            model, example, space, plugins, model_name=config.model.name, model_kwargs=config.model.kwargs,
            threads=t.threads, warmup=t.warmup, repeats=t.repeats, path=path, progress=progress, log=log,
            field=f"{config.source}.search.latency_table",
        )
    except InputError:
        raise
    except Exception as exc:  # a plugin that cannot be profiled must not stop the search
        log(f"warning: latency model not used ({type(exc).__name__}: {exc}); every candidate is measured")
        return None
    return predictor.calibrated(measured_base_ms)


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
