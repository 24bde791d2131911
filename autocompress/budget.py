"""Deployment budgets: ``latency=0.5x`` (relative to the uncompressed model, measured in the same process),
``latency_ms=12``, ``memory_mb=5`` or ``memory=0.25x``, or several at once (``latency=0.5x,memory=0.5x``). A policy
is feasible when each measured cost is at most its limit. The first limit is the one the search trades accuracy
against (the second objective, the Pareto front's cost axis); the others are constraints only."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from autocompress.errors import InputError

_KINDS = {"latency": "latency_ms", "latency_ms": "latency_ms", "memory": "memory_mb", "memory_mb": "memory_mb"}
_FORM = re.compile(r"^\s*([a-z_]+)\s*[=:]\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(x?)\s*$")


@dataclass(frozen=True)
class Budget:
    metric: str  # "latency_ms" or "memory_mb": the trial column the limit applies to
    value: float
    relative: bool  # value is a fraction of the uncompressed model's cost
    also: tuple["Budget", ...] = ()  # further limits, each on another cost (constraints only)

    @classmethod
    def parse(cls, text: str, field: str = "budget") -> "Budget":
        parts = (text or "").split(",")
        if len(parts) == 1:
            return cls._parse_one(text, field)
        budgets = [cls._parse_one(part, field) for part in parts]
        metrics = [b.metric for b in budgets]
        repeated = sorted({m for m in metrics if metrics.count(m) > 1})
        if repeated:
            raise InputError(field, f"{repeated[0].split('_')[0]} is limited twice in {text!r}")
        return dataclasses.replace(budgets[0], also=tuple(budgets[1:]))

    @property
    def parts(self) -> tuple["Budget", ...]:
        """Every limit, the primary first, each as a single budget."""
        return (dataclasses.replace(self, also=()), *self.also)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(b.metric for b in self.parts)

    def limits(self, baseline_latency_ms: float, baseline_memory_mb: float) -> dict[str, float]:
        """``{metric: limit}`` of every limit, the primary first."""
        return {b.metric: b.limit(baseline_latency_ms, baseline_memory_mb) for b in self.parts}

    @classmethod
    def _parse_one(cls, text: str, field: str) -> "Budget":
        m = _FORM.match(text or "")
        if not m:
            raise InputError(field, f"cannot read {text!r} (use latency=0.5x, latency_ms=12, memory_mb=5 or memory=0.25x)")
        kind, number, x = m.groups()
        if kind not in _KINDS:
            raise InputError(field, f"unknown budget {kind!r} (latency, latency_ms, memory, memory_mb)")
        value = float(number)
        if not math.isfinite(value) or value <= 0:
            raise InputError(field, f"must be a positive number, got {number}")
        relative = bool(x) or kind in ("latency", "memory")
        if kind in ("latency", "memory") and not x:
            raise InputError(field, f"{kind}= takes a fraction of the uncompressed model, like {kind}=0.5x")
        if kind in ("latency_ms", "memory_mb") and x:
            raise InputError(field, f"{kind}= takes an absolute number; use {kind.split('_')[0]}=0.5x for a fraction")
        if relative and value > 1.0:
            raise InputError(field, f"a relative budget above 1x ({value}x) allows a larger model than the original")
        return cls(_KINDS[kind], value, relative)

    def limit(self, baseline_latency_ms: float, baseline_memory_mb: float) -> float:
        if not self.relative:
            return self.value
        base = baseline_latency_ms if self.metric == "latency_ms" else baseline_memory_mb
        return self.value * base

    def __str__(self) -> str:
        if self.also:
            return ",".join(str(b) for b in self.parts)
        if self.relative:
            return f"{self.metric.split('_')[0]}={self.value:g}x"
        return f"{self.metric}={self.value:g}"
