"""What a profile must time: the table's layout, the (layer, settings) variants it lacks, which global options are
neutral, and which variants a congruent block can take from its representative instead of being timed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from autocompress.compose import apply_policy
from autocompress.latency_model.layout import Layout, Setting, global_settings, rename_layer, settings_key
from autocompress.latency_model.signatures import failure, structure_signature
from autocompress.latency_model.table import LatencyTable
from autocompress.policy import Policy
from autocompress.space import ResolvedSpace
from autocompress.technique import ApplyContext, Technique


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
