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
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

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


def timed_rounds(
    runs: Mapping[str, Runnable], example: torch.Tensor, threads: int | None = None, warmup: int = 3,
    repeats: int = 10, alternate: bool = False,
) -> dict[str, list[float]]:
    """The one timing loop: each run warmed up ``warmup`` times, then called once per round for ``repeats`` rounds,
    in turns (the order reversed every other round with ``alternate``, so no run always goes first). Returns the
    milliseconds of every call, per run: runs timed in the same round saw the same machine load."""
    calls = {name: _call(run, example) for name, run in runs.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    with num_threads(threads), torch.inference_mode():
        for _, call in order:
            for _ in range(warmup):
                call()
        for i in range(repeats):
            for name, call in (order if not alternate or i % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return samples


def median_ratio(candidate: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of candidate / reference timed in the same round (1.0 with nothing to compare)."""
    ratios = [c / r for c, r in zip(candidate, reference) if r > 0]
    return statistics.median(ratios) if ratios else 1.0


def measure_latency(
    model: Runnable,
    example: torch.Tensor,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> Latency:
    """Median wall time of ``model(example)`` (or of the prepared call) in milliseconds, after ``warmup`` untimed
    runs."""
    samples = timed_rounds({"model": model}, example, threads, warmup, repeats)["model"]
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
    timed = timed_rounds({"ref": reference, "cand": candidate}, example, threads, warmup, repeats, alternate=True)
    ratios = [c / r for c, r in zip(timed["cand"], timed["ref"])]
    return Latency(statistics.median(ratios), tuple(ratios))


def compare_latency(
    models: dict[str, Runnable], example: torch.Tensor, threads: int | None = None, warmup: int = 3, repeats: int = 10
) -> dict[str, Latency]:
    """Measure several models (or prepared calls) interleaved (A B A B ...) so drifting machine load hits them
    alike."""
    timed = timed_rounds(models, example, threads, warmup, repeats)
    return {name: Latency(statistics.median(s), tuple(s)) for name, s in timed.items()}


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
