"""Deployment budgets: ``latency=0.5x`` (relative to the uncompressed model, measured in the same process),
``latency_ms=12``, ``memory_mb=5`` or ``memory=0.25x``, or several at once (``latency=0.5x,memory=0.5x``). A policy
is feasible when each measured cost is at most its limit. The first limit is the one the search trades accuracy
against (the second objective, the Pareto front's cost axis); the others are constraints only.

Each limit is on a :class:`~autocompress.cost_kinds.Cost`, looked up by its name (relative: ``name=0.5x``) or its
column (absolute: ``column=12``) among the registered costs (``Plugins.costs``; the builtin latency and memory when
no registry is given), so a plugin's cost (``params=0.5x``) is budgeted like the builtin ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Mapping

from autocompress.cost_kinds import Cost
from autocompress.errors import InputError

_FORM = re.compile(r"^\s*([a-z_]+)\s*[=:]\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(x?)\s*$")


@dataclass(frozen=True)
class Budget:
    cost: Cost  # what the limit applies to
    value: float
    relative: bool  # value is a fraction of the uncompressed model's cost
    also: tuple["Budget", ...] = ()  # further limits, each on another cost (constraints only)

    @property
    def metric(self) -> str:
        """The trial column the limit applies to (``latency_ms``, ``memory_mb``, a plugin cost's column)."""
        return self.cost.column

    @classmethod
    def parse(cls, text: str, field: str = "budget", costs: Mapping[str, Cost] | None = None) -> "Budget":
        """``costs``: the registered costs by name (``Plugins.costs``); None: the builtin latency and memory."""
        from autocompress.builtins import BUILTIN_COSTS

        costs = BUILTIN_COSTS if costs is None else costs
        words = {**{c.column: c for c in costs.values()}, **{c.name: c for c in costs.values()}}
        budgets = [cls._parse_one(part, field, words, BUILTIN_COSTS) for part in cls.read(text, field)]
        metrics = [b.metric for b in budgets]
        repeated = [b.cost.name for b in budgets if metrics.count(b.metric) > 1]
        if repeated:
            raise InputError(field, f"{sorted(repeated)[0]} is limited twice in {text!r}")
        return dataclasses.replace(budgets[0], also=tuple(budgets[1:]))

    @staticmethod
    def read(text: str, field: str = "budget") -> list[tuple[str, float, bool]]:
        """``(word, value, relative)`` of each limit, checked for form and number only: which words name a cost is
        known once the plugins are loaded (:meth:`parse`)."""
        out = []
        for part in (text or "").split(","):
            m = _FORM.match(part or "")
            if not m:
                raise InputError(field, f"cannot read {part!r} (use latency=0.5x, latency_ms=12, memory_mb=5 or "
                                        "memory=0.25x)")
            word, number, x = m.groups()
            value = float(number)
            if not math.isfinite(value) or value <= 0:
                raise InputError(field, f"must be a positive number, got {number}")
            out.append((word, value, bool(x)))
        return out

    @classmethod
    def _parse_one(cls, part: tuple[str, float, bool], field: str, words: Mapping[str, Cost],
                   builtin: Mapping[str, Cost]) -> "Budget":
        word, value, x = part
        cost = words.get(word)
        if cost is None:  # the builtin words first, as the message has always listed them
            known = ", ".join(sorted(words, key=lambda w: (words[w] not in builtin.values(), w)))
            raise InputError(field, f"unknown budget {word!r} ({known})")
        by_name, by_column = word == cost.name, word == cost.column
        if x and not cost.relative:
            raise InputError(field, f"{word}= takes an absolute number ({cost.name} has no relative budget)")
        if by_name and not by_column and not x:
            raise InputError(field, f"{word}= takes a fraction of the uncompressed model, like {word}=0.5x")
        if by_column and not by_name and x:
            raise InputError(field, f"{word}= takes an absolute number; use {cost.name}=0.5x for a fraction")
        if x and value > 1.0:
            raise InputError(field, f"a relative budget above 1x ({value}x) allows a larger model than the original")
        return cls(cost, value, x)

    @property
    def parts(self) -> tuple["Budget", ...]:
        """Every limit, the primary first, each as a single budget."""
        return (dataclasses.replace(self, also=()), *self.also)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(b.metric for b in self.parts)

    @property
    def costs(self) -> tuple[Cost, ...]:
        return tuple(b.cost for b in self.parts)

    def limits(self, baseline: Mapping[str, float] | float, baseline_memory_mb: float = math.nan) -> dict[str, float]:
        """``{column: limit}`` of every limit, the primary first. ``baseline``: the uncompressed model's cost of
        each column (:meth:`Baseline.costs_by_column`), or its latency in ms followed by its memory in MB."""
        return {b.metric: b.limit(baseline, baseline_memory_mb) for b in self.parts}

    def limit(self, baseline: Mapping[str, float] | float, baseline_memory_mb: float = math.nan) -> float:
        """The primary limit (see :meth:`limits` for ``baseline``)."""
        if not self.relative:
            return self.value
        if not isinstance(baseline, Mapping):
            baseline = {"latency_ms": baseline, "memory_mb": baseline_memory_mb}
        return self.value * float(baseline.get(self.metric, math.nan))

    def __str__(self) -> str:
        if self.also:
            return ",".join(str(b) for b in self.parts)
        if self.relative:
            return f"{self.cost.name}={self.value:g}x"
        return f"{self.metric}={self.value:g}"
