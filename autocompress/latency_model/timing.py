"""The profiler's timing harness: items timed round by round, passes with forward hooks timing layers inside them,
and when their per-round ratios are stable (the ratios themselves: :func:`autocompress.costs.median_ratio`).

End-to-end timings of whole models (trials, the baseline, the profiler's checks) go through
:func:`autocompress.costs.timed_rounds`; this module times layers *inside* passes, which ``torch.utils.benchmark``
cannot (its Timer runs one statement alone, while a layer's ratio needs the variant and the uncompressed pass
interleaved round by round, with hooks).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from autocompress.latency_model.layout import MODEL
from autocompress.latency_model.signatures import has_submodule

#: each timed sample of a layer repeats the call until it lasts this long, so sub-millisecond layers time well
MIN_SAMPLE_MS = 2.0
#: variant rounds stop after this many once every ratio is stable (see run_rounds), else run Timing.rounds
MIN_ROUNDS = 5
#: stable: the per-round ratios' interquartile range within this fraction of their median
STABLE_SPREAD = 0.08


@dataclass(frozen=True)
class Timing:
    threads: int
    warmup: int = 3
    repeats: int = 10
    #: wall time by default (latency is what a user waits); tests may pass ``time.process_time`` with one thread so
    #: other processes on a shared machine do not enter the comparison
    clock: Callable[[], float] = time.perf_counter

    @property
    def rounds(self) -> int:
        return max(self.repeats, 7)


@dataclass
class TimedItem:
    """Something timed in the rounds: a layer alone (``fn`` called ``inner`` times per sample) or a whole model."""

    fn: Callable[[], Any]
    clock: Callable[[], float] = time.perf_counter
    inner: int = 1
    samples: list[float] = field(default_factory=list)

    def sample(self) -> None:
        start = self.clock()
        for _ in range(self.inner):
            self.fn()
        self.samples.append((self.clock() - start) * 1000.0 / self.inner)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


class TimedPass:
    """A realised model timed whole, with forward hooks timing the named layers in every pass."""

    def __init__(self, model: nn.Module, example: torch.Tensor, hooks: list[str], clock: Callable[[], float]) -> None:
        self.model, self.example, self.hooks, self.clock = model, example, list(hooks), clock
        self.inner = 1
        self.samples: list[float] = []
        self.times: dict[str, list[float]] = {h: [] for h in self.hooks}
        self.variants: list[tuple[Any, tuple]] = []
        self._clock = LayerClock(model, [h for h in self.hooks if h != MODEL], clock)

    def fn(self) -> None:
        self.model(self.example)

    def hook_also(self, names: list[str]) -> None:
        """Time these layers too (those the model has): the hooks of every pass of a round are the same."""
        present = [n for n in names if n != MODEL and has_submodule(self.model, n)]
        self._clock = LayerClock(self.model, present, self.clock)
        for n in present:
            if n not in self.times:
                self.hooks.append(n)
                self.times[n] = []

    def sample(self) -> None:
        with self._clock:
            start = self.clock()
            self.model(self.example)
            total = (self.clock() - start) * 1000.0
        self.samples.append(total)
        for h in self.hooks:
            self.times[h].append(total if h == MODEL else self._clock.last.get(h, 0.0))

    def median(self, hook: str) -> float:
        return statistics.median(self.times[hook])


class LayerClock:
    """Forward hooks that time named layers inside a forward pass (``last``: ms per layer in the latest pass)."""

    def __init__(self, model: nn.Module, names: list[str], clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.names, self.clock = model, names, clock
        self.last: dict[str, float] = {}
        self._start: dict[str, float] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "LayerClock":
        self.last = {}
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._begin(n)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._end(n)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _begin(self, name: str) -> None:
        self._start[name] = self.clock()

    def _end(self, name: str) -> None:
        self.last[name] = self.last.get(name, 0.0) + (self.clock() - self._start[name]) * 1000.0


def residuals(p: "TimedPass", roots: list[str]) -> list[float]:
    """Per round: the pass's total minus its top-level layers (what the residual is, measured in one pass)."""
    return [p.times[MODEL][r] - sum(p.times[n][r] for n in roots if n in p.times) for r in range(len(p.samples))]


def ratios_stable(ratios: list[float]) -> bool:
    """Whether more rounds would barely move the median: the rounds' interquartile range is within
    ``STABLE_SPREAD`` of the median."""
    if len(ratios) < MIN_ROUNDS:
        return False
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median > 0 and (q3 - q1) / median <= STABLE_SPREAD


def run_rounds(items: list[TimedItem], timing: Timing, step: Callable[[int], Any],
               stable: Callable[[], bool] | None = None, settled: list[TimedItem] = ()) -> None:
    """Time ``items`` round by round. With ``stable``, rounds stop once it says the ratios are settled (at least
    ``MIN_ROUNDS``): most variants' per-round ratios agree within a few percent after five rounds, and each
    round is a whole forward pass per realised model, the bulk of a profile's time.

    Each sample of a ``settled`` item (the uncompressed reference every ratio divides by) follows an untimed
    call of itself: with torch and oneDNN capped to AVX2 on a Xeon with AMX, a model run right after a bf16
    variant (oneDNN's emulated bf16 GEMMs) took 14% longer than after itself, so a reference timed after one
    made every ratio of its round look 14% smaller. One extra uncompressed pass per round is cheap beside the
    variants' passes."""
    if not items:
        step(timing.rounds)
        return
    for item in items:  # one call warms the item up (its kernels are the uncompressed model's, already warm)
        start = timing.clock()  # and sizes each sample to MIN_SAMPLE_MS
        item.fn()
        once = (timing.clock() - start) * 1000.0
        item.inner = max(1, min(1000, math.ceil(MIN_SAMPLE_MS / max(once, 1e-4))))
    for r in range(timing.rounds):
        shift = r % len(items)  # rotate the order so no item always follows the same one
        for item in items[shift:] + items[:shift]:
            if any(item is s for s in settled):
                item.fn()
            item.sample()
        step(1)
        if stable is not None and r + 1 >= MIN_ROUNDS and r + 1 < timing.rounds and stable():
            step(timing.rounds - r - 1)
            return
