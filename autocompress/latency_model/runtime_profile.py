"""Profile a latency table in a runtime other than torch eager (ONNX Runtime, OpenVINO, a plugin's).

A runtime runs a whole exported graph: there is no forward hook inside it, and its own per-node counters name fused
nodes loosely (OpenVINO folds a layer's activation into its GEMM and leaves the int8 conversions unnamed), so layers
are not timed one by one here. Every entry comes from **whole models**, each prepared by the runtime and timed in
the same rounds as the uncompressed model prepared there (a paired ratio, median of rounds):

* a layer's variant is applied to that layer in *every* congruent block at once (same structure, input and knobs;
  a ViT's blocks usually all are), so one timing carries the change of all of them;
* its entry is a **delta**: the time of the model with the variant's settings minus the time of the model with only
  their context (the settings of the layers around it: its block's pruning, global options), over the number of
  blocks, as a fraction of the uncompressed time. The predictor adds the deltas (a block's entry under its
  settings, plus each child's change under them), so what a pruned block's smaller Linear saves is counted once,
  in context, as in the torch table;
* a layer's identity entry (what the predictor's multiplicative fallbacks scale) is torch eager's in-context share
  of the uncompressed model times the runtime's end-to-end time: an estimate, said so in the entry.

Realised models whose structure is the same (a rank the layer cannot take, a context timed already) are timed once.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Mapping

import torch
from torch import nn

from autocompress.compose import apply_policy
from autocompress.costs import measure_latency, num_threads, paired_ratio
from autocompress.latency_model.copying import path_copy_many
from autocompress.latency_model.layout import MODEL, Layout, Setting, rename_layer, settings_key
from autocompress.latency_model.plan import ProfileStats, plan_profile, split_mirrored
from autocompress.latency_model.profiler import ProfileSession
from autocompress.latency_model.signatures import failure, structure_signature
from autocompress.latency_model.table import LatencyTable
from autocompress.latency_model.timing import Timing
from autocompress.policy import Policy
from autocompress.runtime import Runtime
from autocompress.space import ResolvedSpace
from autocompress.technique import ApplyContext, Technique


def profile_in_runtime(
    table: LatencyTable,
    model: nn.Module,
    example: torch.Tensor,
    space: ResolvedSpace,
    techniques: Mapping[str, Technique],
    timing: Timing,
    runtime: Runtime,
    plugins: Any,
    *,
    max_combinations: int = 64,
    force: bool = False,
    progress: bool | None = None,
) -> tuple[Layout, ProfileStats]:
    """Fill ``table`` with every entry ``space`` needs that it lacks, timed in ``runtime``, and save it."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    stats = ProfileStats()
    model.eval()
    with torch.random.fork_rng(), num_threads(timing.threads), torch.inference_mode():
        layout, tasks, need_base = plan_profile(table, model, space, techniques, stats, max_combinations, force)
        if not (tasks or need_base):
            table.save()
            stats.seconds = time.perf_counter() - started
            return layout, stats
        session = ProfileSession(model, example, layout, techniques, timing)
        mirror = session.congruent_roots()
        own, mirrored = split_mirrored(tasks, layout, mirror, table)
        timer = _WholeModels(model, example, layout, techniques, timing, runtime, plugins, mirror)
        bar = tqdm(total=len(own) + int(need_base), desc=f"profile in {runtime.name}", unit="variant",
                   disable=(None if progress is None else not progress), dynamic_ncols=True)
        try:
            if need_base:
                _identity_entries(table, session, timer, runtime)
                stats.measured += 1
                bar.update(1)
                table.save()
            for i, (name, settings) in enumerate(own):
                key = settings_key(settings)
                try:
                    delta = timer.delta(name, settings)
                except Exception as exc:  # the technique or the runtime cannot realise it: say so in the entry
                    table.put(name, key, {"how": failure(exc)})
                    stats.failed += 1
                else:
                    table.put(name, key, {"delta": round(delta, 6), "how": f"end to end in {runtime.name}"})
                    stats.measured += 1
                    stats.end_to_end += 1
                bar.update(1)
                bar.set_postfix(timed=timer.timed, reused=timer.reused)
                if i % 16 == 15:
                    table.save()
            for name, settings, rep_name, rep_settings in mirrored:
                entry = table.entry(rep_name, settings_key(rep_settings))
                if entry is not None:
                    table.put(name, settings_key(settings), {**entry, "how": f"mirrored from {rep_name}"})
                    stats.reused += 1
                    stats.mirrored += 1
        finally:
            bar.close()
            table.save()
    stats.seconds = time.perf_counter() - started
    return layout, stats


def _identity_entries(table: LatencyTable, session: ProfileSession, timer: "_WholeModels", runtime: Runtime) -> None:
    """``base_ms``: the uncompressed model end to end in the runtime (lowest of three medians); each layer's
    identity: its in-context share of a torch eager pass times that."""
    scratch = LatencyTable(key={})
    session.context_rounds(scratch)
    base = min(measure_latency(timer.reference, timer.example, timer.timing.threads, timer.timing.warmup,
                               timer.timing.rounds).median_ms for _ in range(3))
    table.base_ms = round(base, 6)
    table.put(MODEL, "", {"ms": table.base_ms, "how": f"end to end in {runtime.name}"})
    for name, entries in scratch.entries.items():
        if name == MODEL:
            continue
        share = float(entries[""]["ms"]) / float(scratch.base_ms)
        table.put(name, "", {"ms": round(share * base, 6), "how": "torch eager's share of the model, scaled"})


class _WholeModels:
    """Realise whole models with settings spread over congruent blocks, prepare them in the runtime and time them
    against the uncompressed model (ratios cached by realised structure)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, layout: Layout, techniques: Mapping[str, Technique],
                 timing: Timing, runtime: Runtime, plugins: Any, mirror: dict[str, str]) -> None:
        self.model, self.example, self.layout, self.techniques = model, example, layout, techniques
        self.timing, self.runtime, self.plugins = timing, runtime, plugins
        self.members: dict[str, list[str]] = {}
        for member, rep in mirror.items():
            self.members.setdefault(rep, [rep]).append(member)
        self.reference = runtime.prepare(model, example, timing.threads, plugins)
        self.ratios: dict[str, float] = {}  # structure signature -> time ratio to the uncompressed model
        self.timed = self.reused = 0

    def delta(self, name: str, settings: tuple[Setting, ...]) -> float:
        """(model with ``settings`` - model with their context) / blocks, as a fraction of the uncompressed time."""
        ancestors = self.layout.layers[name].ancestors
        top = ancestors[1] if len(ancestors) > 1 else name
        slots = [MODEL] if name == MODEL else self.members.get(top, [top])
        context = tuple(s for s in settings if self.layout.layer_of(s[0]) != name)
        full = self._ratio(self._spread(settings, top, slots), slots)
        base = self._ratio(self._spread(context, top, slots), slots) if context else 1.0
        return (full - base) / len(slots)

    def _spread(self, settings: tuple[Setting, ...], top: str, slots: list[str]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for param, value in settings:
            if self.layout.layer_of(param) == MODEL or slots == [MODEL]:
                params[param] = value
            else:
                params.update({rename_layer(param, top, slot): value for slot in slots})
        return params

    def _ratio(self, params: dict[str, Any], slots: list[str]) -> float:
        global_ = slots == [MODEL] or any(self.layout.layer_of(p) == MODEL for p in params)
        base = copy.deepcopy(self.model) if global_ else path_copy_many(self.model, slots)
        realised = apply_policy(base, Policy.from_params(params), self.techniques, ApplyContext(structure_only=True),
                                inplace=True)
        sig = structure_signature(realised)
        if sig not in self.ratios:
            candidate = self.runtime.prepare(realised, self.example, self.timing.threads, self.plugins)
            self.ratios[sig] = paired_ratio(self.reference, candidate, self.example, self.timing.threads,
                                            warmup=1, repeats=self.timing.rounds).median_ms
            self.timed += 1
        else:
            self.reused += 1
        return self.ratios[sig]
