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
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autocompress.compose import apply_policy
from autocompress.costs import num_threads
from autocompress.latency_model.copying import path_copy, path_copy_many
from autocompress.latency_model.layout import MODEL, Layout, Setting, global_settings, rename_layer, settings_key
from autocompress.latency_model.table import LatencyTable
from autocompress.policy import Policy
from autocompress.space import ResolvedSpace
from autocompress.technique import ApplyContext, Technique

#: each timed sample of a layer repeats the call until it lasts this long, so sub-millisecond layers time well
MIN_SAMPLE_MS = 2.0
#: variant rounds stop after this many once every ratio is stable (see ProfileSession._rounds), else run Timing.rounds
MIN_ROUNDS = 5
#: stable: the per-round ratios' interquartile range within this fraction of their median
STABLE_SPREAD = 0.08
#: how many variants are realised and timed together (bounds the memory held by realised models)
CHUNK = 32
#: how many congruent blocks of one pass carry the same variant (their times are summed before the ratio is taken)
REPLICAS = 3


@dataclass
class ProfileStats:
    """What one profile run did. ``measured`` counts what was timed now: distinct layer variants, whole-model
    variants, and the uncompressed model's context rounds (one)."""

    variants: int = 0  # (layer, settings) pairs the space needs
    from_table: int = 0  # found in the table: not touched
    measured: int = 0
    reused: int = 0  # same module structure and input as a variant timed in this run: not timed again
    end_to_end: int = 0  # timed as whole-model deltas
    neutral: int = 0  # global option values found to leave the model's structure unchanged
    failed: int = 0  # the technique could not realise the combination
    mirrored: int = 0  # of the reused: taken from the same variant of a congruent block (same shapes, same knobs)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.variants} variants: {self.from_table} from the table, {self.measured} timed "
                f"({self.end_to_end} end to end), {self.reused} reused (same module and input; {self.mirrored} "
                f"from a congruent block), "
                f"{self.failed} failed; {self.neutral} neutral global option values; {self.seconds:.1f} s")


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


def plan_profile(
    table: LatencyTable, model: nn.Module, space: ResolvedSpace, techniques: Mapping[str, Technique],
    stats: ProfileStats, max_combinations: int = 64, force: bool = False,
) -> tuple[Layout, list[tuple[str, tuple[Setting, ...]]], bool]:
    """What a profile must time (every profiler, in torch or another runtime): the layout the entries are keyed by
    (global options classified), the (layer, settings) variants the table lacks (identity entries aside), and
    whether the uncompressed model and the identity entries must be timed. ``force`` empties the table first."""
    if force:
        table.entries.clear()
        table.global_options.clear()
        table.base_ms = None
    globals_ = list(global_settings(space))
    classify_globals(table, model, techniques, globals_)
    layout = Layout.of(space, table.neutral_options(globals_))
    stats.neutral = sum(1 for p, _ in globals_ if p in layout.neutral)
    tasks: list[tuple[str, tuple[Setting, ...]]] = []
    for name in layout.layers:
        combos, _ = layout.combinations(name, max_combinations)
        for settings in combos:
            stats.variants += 1
            if table.has(name, settings_key(settings)):
                stats.from_table += 1
            elif settings:  # identity entries come from the context rounds
                tasks.append((name, settings))
    need_context = table.base_ms is None or any(not table.has(name, "") for name in layout.layers)
    return layout, tasks, need_context


def classify_globals(table: LatencyTable, model: nn.Module, techniques: Mapping[str, Technique],
                      settings: list[Setting]) -> None:
    """Mark each global option value structural or neutral (no module, shape or dtype changes: costs nothing)."""
    todo = [s for s in settings if settings_key([s]) not in table.global_options]
    if not todo:
        return
    base_sig = structure_signature(model)
    for setting in todo:
        try:
            realised = apply_policy(model, Policy.from_params(dict([setting])), techniques,
                                    ApplyContext(structure_only=True))
            structural = structure_signature(realised) != base_sig
            del realised
        except Exception as exc:  # cannot be realised alone: treat as structural, its variants will say why
            structural = True
            table.global_options[settings_key([setting])] = {"structural": True, "how": failure(exc)}
            continue
        table.global_options[settings_key([setting])] = {"structural": structural}


def split_mirrored(
    tasks: list[tuple[str, tuple[Setting, ...]]], layout: Layout, mirror: dict[str, str], table: LatencyTable,
) -> tuple[list[tuple[str, tuple[Setting, ...]]], list[tuple[str, tuple[Setting, ...], str, tuple[Setting, ...]]]]:
    """Tasks to profile, and tasks of congruent blocks to take from their representative block's entries
    ``(name, settings, representative name, representative settings)``."""
    own: list[tuple[str, tuple[Setting, ...]]] = []
    planned: set[tuple[str, str]] = set()
    mirrored = []
    for name, settings in tasks:
        ancestors = layout.layers[name].ancestors
        top = ancestors[1] if len(ancestors) > 1 else name
        rep = mirror.get(top)
        if rep is None:
            if (name, settings_key(settings)) not in planned:
                own.append((name, settings))
                planned.add((name, settings_key(settings)))
            continue
        rep_name = rename_layer(name, top, rep)
        rep_settings = tuple((rename_layer(param, top, rep), value) for param, value in settings)
        mirrored.append((name, settings, rep_name, rep_settings))
        key = settings_key(rep_settings)
        if not table.has(rep_name, key) and (rep_name, key) not in planned:
            own.append((rep_name, rep_settings))
            planned.add((rep_name, key))
    return own, mirrored


# --- a profile session ------------------------------------------------------------------------------------------


@dataclass
class _Item:
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


class _Pass:
    """A realised model timed whole, with forward hooks timing the named layers in every pass."""

    def __init__(self, model: nn.Module, example: torch.Tensor, hooks: list[str], clock: Callable[[], float]) -> None:
        self.model, self.example, self.hooks, self.clock = model, example, list(hooks), clock
        self.inner = 1
        self.samples: list[float] = []
        self.times: dict[str, list[float]] = {h: [] for h in self.hooks}
        self.variants: list[tuple[Any, tuple]] = []
        self._clock = _LayerClock(model, [h for h in self.hooks if h != MODEL], clock)

    def fn(self) -> None:
        self.model(self.example)

    def hook_also(self, names: list[str]) -> None:
        """Time these layers too (those the model has): the hooks of every pass of a round are the same."""
        present = [n for n in names if n != MODEL and _has_submodule(self.model, n)]
        self._clock = _LayerClock(self.model, present, self.clock)
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


@dataclass
class _Variant:
    name: str
    key: str
    how: str
    sig: str = ""  # the timed unit's signature
    identity_sig: str = ""
    whole: nn.Module | None = None  # timed end to end against the uncompressed model


@dataclass
class Captured:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_shape: Any = None


class ProfileSession:
    """State of one profile run: captured inputs per context, and the ratios timed so far."""

    def __init__(self, model: nn.Module, example: torch.Tensor, layout: Layout, techniques: Mapping[str, Technique],
                 timing: Timing) -> None:
        self.model, self.example, self.layout, self.techniques, self.timing = model, example, layout, techniques, timing
        self.step: Callable[[int], Any] = lambda n: None
        names = list(layout.layers)
        self.base = capture(model, MODEL, names, (example,), {})
        self.contexts: OrderedDict[tuple[str, str], dict[str, Captured] | str] = OrderedDict()
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
            key = repr((structure_signature(self.model.get_submodule(root)), _shapes(io.args), _shapes(io.kwargs),
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
        clock = _LayerClock(self.model, names, self.timing.clock)
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
        base = _Pass(self.model, self.example, hooked, self.timing.clock)
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
            _stable(r) for r in ratio_rounds()), settled=[base, *([plain] if plain else [])])
        for p in passes:
            for v, hooks in p.variants:
                variant = [sum(p.times[h][r] for h in hooks) for r in range(len(p.samples))]
                reference = [sum(base.times[h][r] for h in hooks) for r in range(len(base.samples))]
                self.ratios[(v.sig, v.identity_sig)] = _paired_ratio(variant, reference)
                if hooks == [MODEL]:  # what no top-level layer covers, under this global option / uncompressed
                    rest, base_rest = _residuals(p, self.layout.roots), _residuals(base, self.layout.roots)
                    self.residual_ratios[(v.sig, v.identity_sig)] = _paired_ratio(rest, base_rest)
        for v, _ in variants:
            if v.how == "not called":
                table.put(v.name, v.key, {"ratio": 1.0, "how": v.how})
            elif v.how == "removed":
                table.put(v.name, v.key, {"ratio": 0.0, "how": v.how})
            elif v.how.startswith("failed"):
                table.put(v.name, v.key, {"how": v.how})
                stats.failed += 1
            elif v.whole is not None:
                delta = _paired_ratio(wholes[id(v.whole)].samples, plain.samples) - 1.0
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

    def _passes(self, todo: list[tuple["_Variant", tuple[Setting, ...]]]) -> list["_Pass"]:
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
        passes: list[_Pass] = []
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

    def _build_pass(self, placed: list, params: dict[str, Any]) -> "_Pass":
        slots = [slot for *_, group in placed for slot in group]
        global_ = any(self.layout.layer_of(p) == MODEL for p in params)
        model = copy.deepcopy(self.model) if global_ or MODEL in slots else path_copy_many(self.model, slots)
        model = apply_policy(model, Policy.from_params(params), self.techniques, ApplyContext(structure_only=True),
                             inplace=True)
        hooks = [[MODEL if slot == MODEL else rename_layer(v.name, top, slot) for slot in group]
                 for v, _, top, group in placed]
        p = _Pass(model, self.example, [h for group in hooks for h in group], self.timing.clock)
        p.variants = [(v, group) for (v, *_), group in zip(placed, hooks)]
        return p

    def _rounds(self, items: list[_Item], stable: Callable[[], bool] | None = None,
                settled: list[_Item] = ()) -> None:
        """Time ``items`` round by round. With ``stable``, rounds stop once it says the ratios are settled (at least
        ``MIN_ROUNDS``): most variants' per-round ratios agree within a few percent after five rounds, and each
        round is a whole forward pass per realised model, the bulk of a profile's time.

        Each sample of a ``settled`` item (the uncompressed reference every ratio divides by) follows an untimed
        call of itself: with torch and oneDNN capped to AVX2 on a Xeon with AMX, a model run right after a bf16
        variant (oneDNN's emulated bf16 GEMMs) took 14% longer than after itself, so a reference timed after one
        made every ratio of its round look 14% smaller. One extra uncompressed pass per round is cheap beside the
        variants' passes."""
        if not items:
            self.step(self.timing.rounds)
            return
        for item in items:  # one call warms the item up (its kernels are the uncompressed model's, already warm)
            start = self.timing.clock()  # and sizes each sample to MIN_SAMPLE_MS
            item.fn()
            once = (self.timing.clock() - start) * 1000.0
            item.inner = max(1, min(1000, math.ceil(MIN_SAMPLE_MS / max(once, 1e-4))))
        for r in range(self.timing.rounds):
            shift = r % len(items)  # rotate the order so no item always follows the same one
            for item in items[shift:] + items[:shift]:
                if any(item is s for s in settled):
                    item.fn()
                item.sample()
            self.step(1)
            if stable is not None and r + 1 >= MIN_ROUNDS and r + 1 < self.timing.rounds and stable():
                self.step(self.timing.rounds - r - 1)
                return

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
            return _Variant(name, key, how="removed" if ctx_key and self._removed(root, settings, name) else "not called")
        try:
            realised = apply_policy(path_copy(self.model, root), Policy.from_params(dict(settings)), self.techniques,
                                    ApplyContext(structure_only=True), inplace=True)
        except Exception as exc:
            return _Variant(name, key, how=failure(exc))
        try:
            unit = realised.get_submodule(name)
            separable = bool(identity_sig) and _shapes(unit(*io.args, **io.kwargs)) == io.out_shape
        except Exception:
            separable = False
        if not separable:  # its output changes what later layers get, or it cannot run alone
            return _Variant(name, key, how="end to end", whole=realised)
        return _Variant(name, key, how="measured", sig=unit_signature(unit, io.args, io.kwargs),
                        identity_sig=identity_sig)

    def _removed(self, root: str, settings: tuple[Setting, ...], name: str) -> bool:
        """Whether the settings of the layers containing ``name`` remove it (a block pruned of all its heads has no
        ``attn.qkv``): it then costs nothing there, whatever its own settings."""
        ctx = {p: v for p, v in settings if self.layout.layer_of(p) != name}
        try:
            realised = apply_policy(path_copy(self.model, root), Policy.from_params(ctx), self.techniques,
                                    ApplyContext(structure_only=True), inplace=True)
        except Exception:  # noqa: BLE001 - a context that cannot be realised is recorded by _context
            return False
        return not _has_submodule(realised, name)

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
                except Exception as exc:
                    cached = failure(exc)
            self.contexts[(root, ctx_key)] = cached
            while len(self.contexts) > 2:
                self.contexts.popitem(last=False)
        return cached

    def _item(self, fn: Callable[[], Any]) -> _Item:
        return _Item(fn, self.timing.clock)


class _LayerClock:
    """Forward hooks that time named layers inside a forward pass (``last``: ms per layer in the latest pass)."""

    def __init__(self, model: nn.Module, names: list[str], clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.names, self.clock = model, names, clock
        self.last: dict[str, float] = {}
        self._start: dict[str, float] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_LayerClock":
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


# --- pieces -----------------------------------------------------------------------------------------------------


def capture(model: nn.Module, root: str, names: list[str], args: tuple, kwargs: dict) -> dict[str, Captured]:
    """Run ``model``'s submodule ``root`` on ``(args, kwargs)``; the input and output shape of each of ``names``
    (submodules of ``model``, first call each) in that run. Names the run never calls are left out."""
    found: dict[str, Captured] = {}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue

        def pre(mod, a, kw, name=name):
            if name not in found:
                found[name] = Captured(_clone(a), _clone(kw))

        def post(mod, a, output, name=name):
            if name in found and found[name].out_shape is None:
                found[name].out_shape = _shapes(output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.inference_mode():
            model.get_submodule(root)(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


def _residuals(p: "_Pass", roots: list[str]) -> list[float]:
    """Per round: the pass's total minus its top-level layers (what the residual is, measured in one pass)."""
    return [p.times[MODEL][r] - sum(p.times[n][r] for n in roots if n in p.times) for r in range(len(p.samples))]


def _stable(ratios: list[float]) -> bool:
    """Whether more rounds would barely move the median: the rounds' interquartile range is within
    ``STABLE_SPREAD`` of the median."""
    if len(ratios) < MIN_ROUNDS:
        return False
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median > 0 and (q3 - q1) / median <= STABLE_SPREAD


def _paired_ratio(variant: list[float], reference: list[float]) -> float:
    """Median over rounds of variant / reference timed in the same round: load that shifts between rounds cancels."""
    ratios = [v / r for v, r in zip(variant, reference) if r > 0]
    return statistics.median(ratios) if ratios else 1.0


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def structure_signature(module: nn.Module) -> str:
    """A digest of what decides a module's speed: module classes, scalar settings, hooks, tensor shapes, dtypes and
    layouts. Weight values are left out, so the same format of a same-shaped layer in two blocks has one signature.
    """
    parts = []
    for name, m in module.named_modules():
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and _is_scalar(v))
        tensors = [(n, tuple(t.shape), str(t.dtype), str(t.layout))
                   for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None]
        hooks = [getattr(h, "__qualname__", type(h).__name__)
                 for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]]
        parts.append((name, f"{type(m).__module__}.{type(m).__qualname__}", attrs, tensors, hooks))
    return _digest(repr(parts))


def unit_signature(unit: nn.Module, args: tuple, kwargs: dict) -> str:
    return _digest(structure_signature(unit) + "|" + repr(_shapes(args)) + "|" + repr(_shapes(kwargs)))


def failure(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {exc}"[:200]


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _shapes(value: Any) -> Any:
    if _is_scalar(value):
        return value
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _shapes(v)) for k, v in value.items()))
    return type(value).__name__
