"""Costs of a realised model: measured latency and the bytes its weights take as stored.

Latency is never derived from FLOPs or bit counts: the model runs on the target (thread count, batch size) after
warm-up, several times, and the median is kept. What is timed is a torch module (run on the example in torch eager)
or a prepared call (a :class:`~autocompress.runtime.Runtime`'s ``prepare``: the model in ONNX Runtime, OpenVINO). Memory is the byte count of the state dict the model would be saved
with (packed low-bit weights count at their packed size).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch
from torch import nn


#: what the timing functions run: a module (called on the example) or a prepared zero-argument call
Runnable = Union[nn.Module, Callable[[], Any]]


def _call(model: Runnable, example: torch.Tensor) -> Callable[[], Any]:
    if isinstance(model, nn.Module):
        model.eval()
        return lambda: model(example)
    return model


@dataclass(frozen=True)
class Latency:
    median_ms: float
    samples_ms: tuple[float, ...]

    @property
    def spread(self) -> float:
        """Relative interquartile range: how much to trust the median."""
        if len(self.samples_ms) < 4:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return (q[2] - q[0]) / self.median_ms if self.median_ms else 0.0


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_latency(
    model: Runnable,
    example: torch.Tensor,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> Latency:
    """Median wall time of ``model(example)`` (or of the prepared call) in milliseconds, after ``warmup`` untimed
    runs."""
    run = _call(model, example)
    samples = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1000.0)
    return Latency(statistics.median(samples), tuple(samples))


def paired_ratio(
    reference: Runnable, candidate: Runnable, example: torch.Tensor, threads: int | None = None,
    warmup: int = 3, repeats: int = 10,
) -> Latency:
    """``candidate``'s time as a ratio to ``reference``'s, timed in the same rounds: each round runs both, in turns
    (A B, then B A, so neither always runs second), and the result is the median of the rounds' ratios.

    Load that drifts over seconds (another process, a busy host) slows both alike, so the ratio holds where two
    medians taken a minute apart do not: here the same model measured 59 and 83 ms within one search.
    ``samples_ms`` holds the per-round ratios (not milliseconds).
    """
    ratios = []
    reference, candidate = _call(reference, example), _call(candidate, example)
    with num_threads(threads), torch.inference_mode():
        for run in (reference, candidate):
            for _ in range(warmup):
                run()
        for i in range(repeats):
            times = {}
            for name, run in ((("ref", reference), ("cand", candidate)) if i % 2 == 0 else
                              (("cand", candidate), ("ref", reference))):
                start = time.perf_counter()
                run()
                times[name] = time.perf_counter() - start
            ratios.append(times["cand"] / times["ref"])
    return Latency(statistics.median(ratios), tuple(ratios))


def compare_latency(
    models: dict[str, Runnable], example: torch.Tensor, threads: int | None = None, warmup: int = 3, repeats: int = 10
) -> dict[str, Latency]:
    """Measure several models (or prepared calls) interleaved (A B A B ...) so drifting machine load hits them
    alike."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    runs = {name: _call(model, example) for name, model in models.items()}
    with num_threads(threads), torch.inference_mode():
        for run in runs.values():
            for _ in range(warmup):
                run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: Latency(statistics.median(s), tuple(s)) for name, s in samples.items()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state dict, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def memory_mb(model: nn.Module) -> float:
    return weight_bytes(model) / 1e6
