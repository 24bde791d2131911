"""The core's own plugin: the builtin costs (latency, memory), the builtin metric (accuracy) and the builtin runtime
(torch eager), registered through
the same hooks as a third-party plugin's, so that the registry, its duplicate-name errors and the budget's look-up
treat them alike.

The builtin *techniques* are plugin packages loaded through the ``autocompress`` entry-point group; these are not,
because they are the core's own measurements (latency is :meth:`RunContext.measure`, memory
:func:`autocompress.costs.memory_mb`), so the plugin manager registers this module directly, as pytest registers its
builtin plugin modules. It cannot be blocked.
"""

from __future__ import annotations

from typing import Any, Callable

from autocompress.cost_kinds import Cost
from autocompress.hookspecs import hookimpl
from autocompress.metric import ACCURACY, Metric
from autocompress.runtime import TORCH, ONNXRuntime, OpenVINORuntime, Runtime

__all__ = ["BUILTIN_COSTS", "LATENCY", "MEMORY", "PLUGIN_NAME"]

PLUGIN_NAME = "autocompress"


def _latency(model: Any, run: Any) -> float:
    return run.measure(model)  # paired with the uncompressed model (target.paired), see RunContext.measure


def _latency_baseline(model: Any, run: Any) -> float:
    from autocompress.costs import measure_latency

    # the lowest of three medians: every relative budget hangs on this number, and a burst of load from another
    # process during one measurement made a demo's limit 8x too generous
    t = run.config.target
    reference = run.prepared(model)  # in the target's runtime (target.runtime), as every candidate is timed
    return min(measure_latency(reference, run.example, t.threads, t.warmup, t.repeats).median_ms for _ in range(3))


def _memory(model: Any, run: Any) -> float:
    from autocompress.costs import memory_mb

    return memory_mb(model)


LATENCY = Cost("latency", "latency_ms", "ms", _latency, measure_baseline=_latency_baseline,
               label="measured latency (ms)")
MEMORY = Cost("memory", "memory_mb", "MB", _memory, structural=True, label="weight memory (MB)")
#: what a budget can name without any plugin loaded (``Budget.parse`` without a registry)
BUILTIN_COSTS = {c.name: c for c in (LATENCY, MEMORY)}


@hookimpl
def autocompress_register_costs(register: Callable[[Cost], None]) -> None:
    for cost in BUILTIN_COSTS.values():
        register(cost)


@hookimpl
def autocompress_register_metrics(register: Callable[[Metric], None]) -> None:
    register(ACCURACY)


@hookimpl
def autocompress_register_runtimes(register: Callable[[Runtime], None]) -> None:
    register(TORCH)  # always there
    register(ONNXRuntime())  # need their extra only when a config asks for them
    register(OpenVINORuntime())
