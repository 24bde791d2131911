"""Before any trial: drop the choices this machine makes useless.

A choice can be slower than leaving the layer alone: bf16 Linears on a CPU with AVX2 alone run 8-18x slower than
fp32 (emulated), so under a latency budget every trial that draws bf16 somewhere is wasted, and a sampler over a
hundred per-layer knobs keeps drawing it (36 of 40 demo trials over a 0.5x budget on such a CPU). Each choice of
the space is timed once, applied on every layer that offers it, in the same rounds as the uncompressed model
(:func:`autocompress.costs.paired_ratio`); one that is clearly slower (``SLOWER``) is left out of the search for this
run, when the budget is latency: under a memory budget a slow format may still be what saves the bytes. A choice
measured several times slower after one round needs no more rounds. Recovery techniques (training) are not timed:
they change weights, not the structure that runs.

Under a runtime other than torch (``target.runtime``), a choice the runtime cannot run at all (a format with no
kernel or export path there) is left out first, whatever the budget (:func:`unsupported_choices`), and the others are
timed in that runtime.

The outcome is part of the run's baseline (``Baseline.slow_choices``, ``Baseline.unsupported``), so a resumed run
and every worker of a shared study search the same space, without timing again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autocompress.compose import apply_policy
from autocompress.config import TargetConfig
from autocompress.costs import paired_ratio
from autocompress.errors import InputError
from autocompress.runtime import TORCH, Runtime
from autocompress.space import ResolvedSpace
from autocompress.technique import ApplyContext, Stage, Technique

__all__ = ["SLOWER", "choice_label", "measure_slow_choices", "unsupported_choices", "without_choices"]

#: a choice whose model runs at least this many times the uncompressed model's time is useless for latency
SLOWER = 1.1
#: after one round, a ratio past this decides at once
CLEARLY_SLOWER = 3.0
#: a ratio between SLOWER and this is measured twice and must be slower both times: a burst of load during one
#: measurement made a tiny model's MLP pruning (truly ~0.95x) read 1.1x once in a CI run, and it was left out
CONFIRM_BELOW = 1.5


def choice_label(technique: str, knob: str, value: Any) -> str:
    return f"{technique}.{knob}={value}"


def measure_slow_choices(
    model: nn.Module, space: ResolvedSpace, techniques: Mapping[str, Technique], example: torch.Tensor,
    target: TargetConfig, log: Callable[[str], None] = print, runtime: Runtime = TORCH, plugins: Any = None,
) -> dict[str, float]:
    """``{choice label: measured time ratio}`` of every choice at least :data:`SLOWER` x the uncompressed model,
    both run in ``runtime`` (``plugins``: what a runtime other than torch prepares the models with)."""
    slow: dict[str, float] = {}
    reference = _structure(model)
    base = runtime.prepare(model, example, target.threads, plugins)
    for (tech, knob), values in _choices(space, techniques).items():
        for value in values:
            policy = space.policy(space.uniform(tech, knob, value))
            realised = apply_policy(model, policy, techniques, ApplyContext(structure_only=True))
            if _structure(realised) == reference:
                continue  # runs exactly what the uncompressed model runs (an option such as a pruning criterion)
            candidate = runtime.prepare(realised, example, target.threads, plugins)
            ratio = paired_ratio(base, candidate, example, target.threads, warmup=1, repeats=1).median_ms
            if ratio < CLEARLY_SLOWER:
                ratio = paired_ratio(base, candidate, example, target.threads, warmup=0,
                                     repeats=max(3, target.repeats)).median_ms
                if SLOWER <= ratio < CONFIRM_BELOW:  # near the line: slower only if a second look agrees
                    ratio = min(ratio, paired_ratio(base, candidate, example, target.threads, warmup=0,
                                                    repeats=max(3, target.repeats)).median_ms)
            if ratio >= SLOWER:
                slow[choice_label(tech, knob, value)] = round(float(ratio), 3)
            del candidate, realised
    return slow


def unsupported_choices(
    model: nn.Module, space: ResolvedSpace, techniques: Mapping[str, Technique], example: torch.Tensor,
    runtime: Runtime, plugins: Any, threads: int,
) -> dict[str, str]:
    """``{choice label: why}`` of every choice ``runtime`` refuses to run (applied on every layer that offers it)."""
    out: dict[str, str] = {}
    reference = _structure(model)
    for (tech, knob), values in _choices(space, techniques).items():
        for value in values:
            realised = apply_policy(model, space.policy(space.uniform(tech, knob, value)), techniques,
                                    ApplyContext(structure_only=True))
            if _structure(realised) == reference:
                continue
            try:
                runtime.prepare(realised, example[:2], threads, plugins)
            except InputError as exc:
                out[choice_label(tech, knob, value)] = f"{exc.field}: {exc.message}"
            del realised
    return out


def without_choices(space: ResolvedSpace, slow: Mapping[str, float]) -> ResolvedSpace:
    """``space`` less the choices in ``slow``; a dimension left with its identity alone goes."""
    dims = []
    for d in space.dimensions:
        choices = tuple(c for c in d.choices if c == d.identity or choice_label(d.technique, d.knob, c) not in slow)
        if len(choices) > 1:
            dims.append(dataclasses.replace(d, choices=choices))
    kept = {d.name for d in dims}
    baselines = {label: params for label, params in space.extra_baselines.items()
                 if not any(choice_label(d.technique, d.knob, params.get(d.name)) in slow for d in space.dimensions)}
    return ResolvedSpace(dims, extra_baselines={label: {k: v for k, v in p.items() if k in kept}
                                                for label, p in baselines.items()},
                         left_out=dict(space.left_out))


def _choices(space: ResolvedSpace, techniques: Mapping[str, Technique]) -> dict[tuple[str, str], list[Any]]:
    """Every non-identity value of every knob of a technique that changes what runs, in space order."""
    out: dict[tuple[str, str], list[Any]] = {}
    for d in space.dimensions:
        if techniques[d.technique].stage == Stage.RECOVERY:
            continue
        values = out.setdefault((d.technique, d.knob), [])
        values += [c for c in d.choices if c != d.identity and c not in values]
    return out


def _structure(model: nn.Module) -> tuple:
    """What decides the kernels that run: module types, tensor shapes and dtypes (not the values)."""
    return (tuple((name, type(m)) for name, m in model.named_modules()),
            tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()))
