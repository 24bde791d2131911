"""Profile a latency table: realise each layer variant the installed techniques can produce and time it on the
target, inside the model, on the input that layer really gets.

A shared 2-core machine drifts in load by 2x within seconds, and one layer's time in one pass varies by +-20% on
it, so nothing is compared across moments and nothing rests on one sample:

* **Context rounds** time the uncompressed model end to end (``base_ms``) and, with forward hooks in passes of the
  same rounds, each searched layer *in context*: its identity entry is its median share of a pass times
  ``base_ms``. The residual — patch embedding, norms, attention matmuls, softmax, GELU: whatever no searched layer
  covers — is ``base_ms`` minus the top-level layers' entries.
* **Variant passes**: variants are realised into whole models, each variant into up to ``REPLICAS`` congruent blocks
  (same structure, input and knobs; their times are summed) and different variants into other blocks of the same
  model, and timed with hooks during whole forward passes, round by round with a pass of the uncompressed model
  carrying the same hooks. An entry stores the **ratio** (variant / uncompressed layer), as the median over rounds
  of the ratio within a round; the predicted time of a variant is its layer's in-context time times that ratio.
  Timing a layer inside the model keeps its cache and threading conditions (timed alone, a layer's weights and
  input stay hot and small GEMMs look cheaper than they are).
* A global option's residual (``quantization.compute=bf16`` also makes norms and attention bf16) is measured in
  its own passes as a ratio too, not as the difference of two large, separately timed numbers.

Realising a variant: the settings (its own and those of the searched layers that contain it) are applied with
``structure_only=True`` exactly as a trial applies them, minus calibration and training: kernels and shapes are a
trial's, weight values do not change timings. Models are copied cheaply (``copying.py``): only the changed blocks
are deep-copied (the whole model under a global option). Each variant is first realised alone to read its module
structure on its real input (captured with forward hooks; a pruned MLP feeds ``fc2`` fewer channels, a bf16 model
feeds every layer bf16): variants equal to an already-timed one are not timed again, and a block congruent with an
earlier one takes that block's ratios after one variant is checked to realise identically — what keeps a 12-block
model cheap.

A variant that changes its layer's output shape (a block that merges tokens) changes the work of every later layer;
it is timed end to end instead, interleaved with the uncompressed model, and stored as a delta (a fraction of
``base_ms``). Global options that change no module class, scalar setting, tensor shape or dtype (recovery
training) are marked neutral and never timed.

One file per job: what to time (``plan.py``), the timing harness (``timing.py``: rounds, hooked passes, ratios),
what decides a module's speed and the inputs it gets (``signatures.py``), cheap model copies (``copying.py``), the
table (``table.py``); this file runs a profile with them.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autocompress.compose import apply_policy
from autocompress.costs import median_ratio, num_threads
from autocompress.latency_model.copying import path_copy, path_copy_many
from autocompress.latency_model.layout import MODEL, Layout, Setting, rename_layer, settings_key
from autocompress.latency_model.plan import ProfileStats, plan_profile, split_mirrored
from autocompress.latency_model.signatures import (
    Captured, capture, failure, has_submodule, shapes, structure_signature, unit_signature,
)
from autocompress.latency_model.table import LatencyTable
from autocompress.latency_model.timing import (
    LayerClock, TimedItem, TimedPass, Timing, ratios_stable, residuals, run_rounds,
)
from autocompress.policy import Policy
from autocompress.space import ResolvedSpace
from autocompress.technique import ApplyContext, Technique

#: how many variants are realised and timed together (bounds the memory held by realised models)
CHUNK = 32
#: how many congruent blocks of one pass carry the same variant (their times are summed before the ratio is taken)
REPLICAS = 3


def profile(
    table: LatencyTable,
    model: nn.Module,
    example: torch.Tensor,
    space: ResolvedSpace,
    techniques: Mapping[str, Technique],
    timing: Timing,
    *,
    max_combinations: int = 64,
    force: bool = False,
    progress: bool | None = None,
) -> tuple[Layout, ProfileStats]:
    """Fill ``table`` with every entry ``space`` needs that it lacks (all of them with ``force``) and save it.

    Returns the layout the entries are keyed by (global options classified) and what was done.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    stats = ProfileStats()
    model.eval()
    with torch.random.fork_rng(), num_threads(timing.threads), torch.inference_mode():
        layout, tasks, need_context = plan_profile(table, model, space, techniques, stats, max_combinations, force)
        if not (tasks or need_context):
            table.save()
            stats.seconds = time.perf_counter() - started
            return layout, stats

        session = ProfileSession(model, example, layout, techniques, timing)
        own, mirrored = split_mirrored(tasks, layout, session.congruent_roots(), table)
        own.sort(key=lambda t: (session.context_of(*t), t[0]))  # one context's tasks together: one capture each
        chunks = [own[i : i + CHUNK] for i in range(0, len(own), CHUNK)]
        bar = tqdm(total=len(own) + len(mirrored) + timing.rounds * (len(chunks) + int(need_context)),
                   desc="profile", unit="step", disable=(None if progress is None else not progress),
                   dynamic_ncols=True)
        session.step = bar.update
        try:
            if need_context:
                session.context_rounds(table)
                stats.measured += 1
                table.save()
            for chunk in chunks:
                session.variant_chunk(table, chunk, stats)
                bar.set_postfix(timed=stats.measured, reused=stats.reused)
                table.save()
            leftover = session.copy_mirrored(table, mirrored, stats)
            if leftover:  # a block that is not congruent after all, or position-dependent variants
                leftover.sort(key=lambda t: (session.context_of(*t), t[0]))
                bar.total += timing.rounds * (-(-len(leftover) // CHUNK))
                for i in range(0, len(leftover), CHUNK):
                    session.variant_chunk(table, leftover[i : i + CHUNK], stats)
                    table.save()
        finally:
            bar.close()
            table.save()
    stats.seconds = time.perf_counter() - started
    return layout, stats


# --- a profile session ------------------------------------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    key: str
    how: str
    sig: str = ""  # the timed unit's signature
    identity_sig: str = ""
    whole: nn.Module | None = None  # timed end to end against the uncompressed model


class ProfileSession:
    """State of one profile run: captured inputs per context, and the ratios timed so far."""

    def __init__(self, model: nn.Module, example: torch.Tensor, layout: Layout, techniques: Mapping[str, Technique],
                 timing: Timing) -> None:
        self.model, self.example, self.layout, self.techniques, self.timing = model, example, layout, techniques, timing
        self.step: Callable[[int], Any] = lambda n: None
        names = list(layout.layers)
        self.base = capture(model, MODEL, names, (example,), {})
        self.contexts: OrderedDict[tuple[str, str], dict[str, Captured] | str] = OrderedDict()
        #: per context: the searched layers its settings remove (kept when the context's inputs are evicted: small)
        self.removed: dict[tuple[str, str], frozenset[str]] = {}
        self.mirror: dict[str, str] = {}  # congruent block -> the first of its kind (see congruent_roots)
        self.ratios: dict[tuple[str, str], float] = {}  # (signature, identity signature) -> ratio, this run
        self.residual_ratios: dict[tuple[str, str], float] = {}  # the same, for the residual under global options

    def congruent_roots(self) -> dict[str, str]:
        """Top-level searched layers (blocks) that repeat an earlier one: same module structure, same input shape,
        same knobs and choices relative to the block. Maps each repeat to the first of its kind."""
        first: dict[str, str] = {}
        mirror: dict[str, str] = {}
        for root in self.layout.roots:
            io = self.base.get(root)
            if io is None:
                continue
            knobs = sorted(
                (rename_layer(k.param, root, "#"), repr(k.choices), repr(k.identity))
                for layer in (root, *self.layout.descendants(root)) for k in self.layout.layers[layer].knobs
            )
            key = repr((structure_signature(self.model.get_submodule(root)), shapes(io.args), shapes(io.kwargs),
                        knobs))
            if key in first:
                mirror[root] = first[key]
            else:
                first[key] = root
        self.mirror = mirror
        return mirror

    def copy_mirrored(self, table: LatencyTable, mirrored: list, stats: ProfileStats) -> list[tuple[str, tuple]]:
        """Copy the representative block's ratios to congruent blocks, after checking one variant per block
        realises to the same module; return the tasks that must be profiled on their own."""
        by_top: dict[str, list] = {}
        for item in mirrored:
            top = next(a for a in (*self.layout.layers[item[0]].ancestors[1:], item[0]))
            by_top.setdefault(top, []).append(item)
        leftover: list[tuple[str, tuple]] = []
        for top, items in by_top.items():
            timed = [it for it in items if "sig" in (table.entry(it[2], settings_key(it[3])) or {})]
            congruent = True
            if timed:  # realise the richest variant in this block: it must be the representative's module
                name, settings, rep_name, rep_settings = max(timed, key=lambda it: len(it[1]))
                check = self._realise(name, settings)
                congruent = check.sig == table.entry(rep_name, settings_key(rep_settings))["sig"]
            for name, settings, rep_name, rep_settings in items:
                entry = table.entry(rep_name, settings_key(rep_settings)) or {}
                if congruent and "ratio" in entry:
                    table.put(name, settings_key(settings), {**entry, "how": f"mirrored from {rep_name}"})
                    stats.reused += 1
                    stats.mirrored += 1
                    self.step(1)
                else:
                    leftover.append((name, settings))
        return leftover

    def context_of(self, name: str, settings: tuple[Setting, ...]) -> tuple[str, str]:
        """(realisation root, key of the settings of the layers that contain ``name``)."""
        ctx = tuple(s for s in settings if self.layout.layer_of(s[0]) != name)
        return (self.layout.realisation_root(name, ctx), settings_key(ctx)) if ctx else ("", "")

    # context: the uncompressed model end to end and each searched layer in it

    def context_rounds(self, table: LatencyTable) -> None:
        """``base_ms``: the median plain forward pass. A layer's identity entry: its median share of a hooked pass
        (layer time / that pass's total, both from one pass) times ``base_ms``, so a load spike in one pass cannot
        make the layers add up to more than the model."""
        names = [n for n in self.layout.layers if n != MODEL]
        shares: dict[str, list[float]] = {n: [] for n in names}
        clock = LayerClock(self.model, names, self.timing.clock)
        plain = self._item(lambda: self.model(self.example))
        hooked = self._item(lambda: self.model(self.example))
        for _ in range(max(1, self.timing.warmup)):
            self.model(self.example)
        for _ in range(self.timing.rounds):
            plain.sample()
            with clock:
                hooked.sample()
            for n in names:
                shares[n].append(clock.last.get(n, 0.0) / hooked.samples[-1])
            self.step(1)
        table.base_ms = round(plain.median, 6)
        table.put(MODEL, "", {"ms": table.base_ms, "how": "end to end"})
        for n in names:
            called = n in self.base
            table.put(n, "", {"ms": round(statistics.median(shares[n]) * table.base_ms, 6),
                              "how": "in context" if called else "not called"})

    # layer variants: realise, deduplicate, time with their uncompressed layer, store ratios

    def variant_chunk(
        self, table: LatencyTable, chunk: list[tuple[str, tuple[Setting, ...]]], stats: ProfileStats
    ) -> None:
        """Realise the chunk's variants, then time each distinct one *in context*: several variants go into one
        realised model, each in its own block (congruent blocks are interchangeable), and forward hooks time them
        during whole passes, round by round with the uncompressed model's pass. A variant's ratio is its layer's
        time in its pass over the same layer's time in the uncompressed pass."""
        variants = []
        for name, settings in chunk:
            variants.append((self._realise(name, settings), settings))
            self.step(1)
        first: dict[tuple[str, str], tuple[_Variant, tuple[Setting, ...]]] = {}
        for v, settings in variants:
            if v.sig and (v.sig, v.identity_sig) not in self.ratios:
                first.setdefault((v.sig, v.identity_sig), (v, settings))
        passes = self._passes(list(first.values()))
        wholes = {id(v.whole): self._item(lambda m=v.whole: m(self.example))
                  for v, _ in variants if v.whole is not None}
        # every pass carries the same hooks, so their (small) cost is the same in the variant and the reference
        hooked = sorted({h for p in passes for h in p.hooks})
        if any(MODEL in p.hooks for p in passes):  # the residual under a global option, from the same passes
            hooked = sorted({*hooked, *self.layout.roots})
        for p in passes:
            p.hook_also(hooked)
        base = TimedPass(self.model, self.example, hooked, self.timing.clock)
        plain = self._item(lambda: self.model(self.example)) if wholes else None
        def ratio_rounds() -> list[list[float]]:
            """Per variant, its per-round ratios so far (what decides whether more rounds are needed)."""
            out = []
            for p in passes:
                for _, hooks in p.variants:
                    out.append([sum(p.times[h][r] for h in hooks) / max(1e-9, sum(base.times[h][r] for h in hooks))
                                for r in range(len(p.samples))])
            for item in wholes.values():
                out.append([a / max(1e-9, b) for a, b in zip(item.samples, plain.samples)])
            return out

        self._rounds([base, *passes, *wholes.values(), *([plain] if plain else [])], stable=lambda: all(
            ratios_stable(r) for r in ratio_rounds()), settled=[base, *([plain] if plain else [])])
        for p in passes:
            for v, hooks in p.variants:
                variant = [sum(p.times[h][r] for h in hooks) for r in range(len(p.samples))]
                reference = [sum(base.times[h][r] for h in hooks) for r in range(len(base.samples))]
                self.ratios[(v.sig, v.identity_sig)] = median_ratio(variant, reference)
                if hooks == [MODEL]:  # what no top-level layer covers, under this global option / uncompressed
                    rest, base_rest = residuals(p, self.layout.roots), residuals(base, self.layout.roots)
                    self.residual_ratios[(v.sig, v.identity_sig)] = median_ratio(rest, base_rest)
        for v, _ in variants:
            if v.how == "not called":
                table.put(v.name, v.key, {"ratio": 1.0, "how": v.how})
            elif v.how == "removed":
                table.put(v.name, v.key, {"ratio": 0.0, "how": v.how})
            elif v.how.startswith("failed"):
                table.put(v.name, v.key, {"how": v.how})
                stats.failed += 1
            elif v.whole is not None:
                delta = median_ratio(wholes[id(v.whole)].samples, plain.samples) - 1.0
                table.put(v.name, v.key, {"delta": round(delta, 6), "how": "end to end"})
                stats.measured += 1
                stats.end_to_end += 1
            else:
                pair = (v.sig, v.identity_sig)
                timed_now = pair in first and first[pair][0] is v
                stats.measured += timed_now
                stats.reused += not timed_now
                entry = {"ratio": round(self.ratios[pair], 6), "how": "measured in context" if timed_now else "reused",
                         "sig": v.sig}
                if pair in self.residual_ratios:
                    entry["residual_ratio"] = round(self.residual_ratios[pair], 6)
                table.put(v.name, v.key, entry)

    def _passes(self, todo: list[tuple["_Variant", tuple[Setting, ...]]]) -> list["TimedPass"]:
        """Pack variants into realised models. A variant goes into up to ``REPLICAS`` congruent blocks of one pass
        (its ratio is then taken over all of them: a single layer's time in one pass is noisy on a busy machine),
        different variants into other blocks of the same pass; passes are split by global option settings, which
        apply to the whole model."""
        members: dict[str, list[str]] = {}
        for member, rep in self.mirror.items():
            members.setdefault(rep, [rep]).append(member)
        groups: dict[str, list] = {}
        for v, settings in todo:
            if v.name == MODEL:  # a global option alone: the whole pass is its unit
                groups.setdefault("whole:" + v.key, []).append((v, settings, MODEL))
                continue
            ancestors = self.layout.layers[v.name].ancestors
            top = ancestors[1] if len(ancestors) > 1 else v.name
            global_key = settings_key([s for s in settings if self.layout.layer_of(s[0]) == MODEL])
            groups.setdefault(global_key, []).append((v, settings, top))
        passes: list[TimedPass] = []
        for key, items in groups.items():
            if key.startswith("whole:"):
                v, settings, _ = items[0]
                passes.append(self._build_pass([(v, settings, MODEL, [MODEL])], dict(settings)))
                continue
            open_passes: list[dict[str, Any]] = []  # {"used": set of blocks, "placed": [(v, settings, top, slots)]}
            for v, settings, top in items:
                candidates = members.get(top, [top])
                want = min(REPLICAS, len(candidates))
                for p in open_passes:
                    free = [s for s in candidates if s not in p["used"]]
                    if len(free) >= want:
                        break
                else:
                    p = {"used": set(), "placed": []}
                    open_passes.append(p)
                    free = list(candidates)
                slots = free[:want]
                p["used"].update(slots)
                p["placed"].append((v, settings, top, slots))
            global_params = {p: val for p, val in items[0][1] if self.layout.layer_of(p) == MODEL}
            for p in open_passes:
                params = dict(global_params)
                for v, settings, top, slots in p["placed"]:
                    for slot in slots:
                        params.update({rename_layer(q, top, slot): val for q, val in settings
                                       if self.layout.layer_of(q) != MODEL})
                passes.append(self._build_pass(p["placed"], params))
        return passes

    def _build_pass(self, placed: list, params: dict[str, Any]) -> "TimedPass":
        slots = [slot for *_, group in placed for slot in group]
        global_ = any(self.layout.layer_of(p) == MODEL for p in params)
        model = copy.deepcopy(self.model) if global_ or MODEL in slots else path_copy_many(self.model, slots)
        model = apply_policy(model, Policy.from_params(params), self.techniques, ApplyContext(structure_only=True),
                             inplace=True)
        hooks = [[MODEL if slot == MODEL else rename_layer(v.name, top, slot) for slot in group]
                 for v, _, top, group in placed]
        p = TimedPass(model, self.example, [h for group in hooks for h in group], self.timing.clock)
        p.variants = [(v, group) for (v, *_), group in zip(placed, hooks)]
        return p

    def _rounds(self, items: list[TimedItem], stable: Callable[[], bool] | None = None,
                settled: list[TimedItem] = ()) -> None:
        run_rounds(items, self.timing, self.step, stable=stable, settled=settled)

    def _realise(self, name: str, settings: tuple[Setting, ...]) -> _Variant:
        key = settings_key(settings)
        identity_sig = self._identity(name)
        root, ctx_key = self.context_of(name, settings)
        root = root if ctx_key else name
        inputs = self._context(root, ctx_key, settings, name)
        if isinstance(inputs, str):
            return _Variant(name, key, how=inputs)
        io = inputs.get(name)
        if io is None:
            # removed by the settings of a layer that contains it (a block pruned of all its heads has no attn.qkv):
            # it costs nothing there, whatever its own settings
            return _Variant(name, key, how="removed" if name in self.removed.get((root, ctx_key), ()) else "not called")
        try:
            realised = apply_policy(path_copy(self.model, root), Policy.from_params(dict(settings)), self.techniques,
                                    ApplyContext(structure_only=True), inplace=True)
        except Exception as exc:
            return _Variant(name, key, how=failure(exc))
        try:
            unit = realised.get_submodule(name)
            separable = bool(identity_sig) and shapes(unit(*io.args, **io.kwargs)) == io.out_shape
        except Exception:
            separable = False
        if not separable:  # its output changes what later layers get, or it cannot run alone
            return _Variant(name, key, how="end to end", whole=realised)
        return _Variant(name, key, how="measured", sig=unit_signature(unit, io.args, io.kwargs),
                        identity_sig=identity_sig)

    def _identity(self, name: str) -> str:
        """Signature of the uncompressed layer on its input ('' if it cannot run on its own)."""
        io = self.base.get(name)
        if io is None:
            return ""
        return unit_signature(self.model.get_submodule(name), io.args, io.kwargs)

    def _context(self, root: str, ctx_key: str, settings: tuple[Setting, ...], name: str) -> dict[str, Captured] | str:
        """Inputs of the layers under ``root`` when the context settings are applied (cached, two contexts)."""
        if not ctx_key:
            return self.base
        cached = self.contexts.get((root, ctx_key))
        if cached is None:
            ctx = {p: v for p, v in settings if self.layout.layer_of(p) != name}
            root_io = self.base.get(root)
            if root_io is None:
                cached = "not called"
            else:
                try:
                    realised = apply_policy(path_copy(self.model, root), Policy.from_params(ctx), self.techniques,
                                            ApplyContext(structure_only=True), inplace=True)
                    names = [root, *self.layout.descendants(root)]
                    cached = capture(realised, root, names, root_io.args, root_io.kwargs)
                    self.removed[(root, ctx_key)] = frozenset(n for n in names if not has_submodule(realised, n))
                except Exception as exc:
                    cached = failure(exc)
            self.contexts[(root, ctx_key)] = cached
            while len(self.contexts) > 2:
                self.contexts.popitem(last=False)
        return cached

    def _item(self, fn: Callable[[], Any]) -> TimedItem:
        return TimedItem(fn, self.timing.clock)
