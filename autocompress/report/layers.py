"""The chosen policy as a grid: one row per block (``blocks.3``) or stand-alone layer (``head``), one panel per
technique knob (``quantization.format``, ``lowrank.rank``, ``pruning.heads`` ...), one column per sub-layer.

Everything is derived from the parameter column names (``<layer>:<technique>.<knob>``), so a third-party
technique's knobs appear without the report knowing them. A value is "changed" when it differs from the parameter's
identity (saved in ``resolved_space.yaml``; for a run written before that, what the uncompressed baseline trial
chose), or, without either, when the saved best policy lists it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from autocompress.report.rundata import ParamColumn, RunData

_GROUP = re.compile(r"^(.*\.\d+)(?:\.(\D.*))?$")
#: data-flow order of a timm ViT block's Linear layers; other sub-layers follow in natural order
_SUB_ORDER = ("", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass
class Cell:
    value: Any
    changed: bool
    simulated: bool = False


@dataclass
class Panel:
    """One knob of one technique across the layers it was searched on."""

    key: str  # "technique.knob"
    columns: list[str]  # sub-layer names; "" is the row's block itself
    cells: dict[tuple[str, str | None], Cell]  # (row, column); column None: a stand-alone layer spanning the panel
    scale: list[Any]  # every value this knob took in the run, sorted: the colour scale
    numeric: bool


@dataclass
class LayerPicture:
    trial: int
    rows: list[str]
    standalone: set[str]
    panels: list[Panel]
    options: dict[str, Cell] = field(default_factory=dict)  # global knobs: "technique.knob" -> value

    @property
    def n_changed(self) -> int:
        return sum(c.changed for p in self.panels for c in p.cells.values())


def split_layer(layer: str) -> tuple[str, str | None]:
    """``blocks.3.attn.qkv`` -> (``blocks.3``, ``attn.qkv``); ``blocks.3`` -> (``blocks.3``, ``""``);
    ``head`` -> (``head``, None) (a stand-alone layer)."""
    m = _GROUP.match(layer)
    if not m:
        return layer, None
    return m.group(1), m.group(2) or ""


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def layer_picture(run: RunData, row: pd.Series | None = None) -> LayerPicture | None:
    """The grid of the run's best feasible policy (or of ``row``); None when there is nothing to draw."""
    row = run.best if row is None else row
    if row is None or not run.params:
        return None
    identity = _identities(run)
    simulated = set(str(row.get("simulated", "") or "").split())
    panels: dict[str, Panel] = {}
    rows: set[str] = set()
    standalone: set[str] = set()
    options: dict[str, Cell] = {}
    for param in run.params:
        value = _plain(row.get(param.name))
        if value is None:
            continue
        changed = _changed(run, param, value, identity)
        if param.layer is None:
            options[param.key] = Cell(value, changed)
            continue
        group, sub = split_layer(param.layer)
        rows.add(group)
        if sub is None:
            standalone.add(group)
        panel = panels.get(param.key)
        if panel is None:
            scale = _scale(run.trials, [p.name for p in run.params if p.key == param.key])
            panel = panels[param.key] = Panel(param.key, [], {}, scale, _all_numbers(scale))
        if sub is not None and sub not in panel.columns:
            panel.columns.append(sub)
        panel.cells[(group, sub)] = Cell(value, changed, f"{param.layer}:{param.technique}" in simulated)
    if not panels and not options:
        return None
    for panel in panels.values():
        panel.columns.sort(key=lambda c: (_SUB_ORDER.index(c) if c in _SUB_ORDER else len(_SUB_ORDER), natural_key(c)))
    order = sorted(rows, key=lambda r: (r in standalone, natural_key(r)))
    ordered = [panels[k] for k in sorted(panels)]  # by technique, then knob: the same order in every report
    return LayerPicture(int(row["number"]), order, standalone, ordered, dict(sorted(options.items())))


def format_value(value: Any) -> str:
    """A knob value as a person reads it: ``0.5``, ``4``, ``bf16``, ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _identities(run: RunData) -> dict[str, Any]:
    if run.identities is not None:
        return {p.name: _plain(run.identities.get(p.name)) for p in run.params}
    base = run.uncompressed_row()
    if base is None:
        return {}
    return {p.name: _plain(base.get(p.name)) for p in run.params}


def _changed(run: RunData, param: ParamColumn, value: Any, identity: dict[str, Any]) -> bool:
    if param.name in identity and identity[param.name] is not None:
        return not _same(value, identity[param.name])
    policy = (run.best_policy or {}).get("techniques") or {}
    settings = policy.get(param.technique) or {}
    if param.layer is None:
        return param.knob in (settings.get("options") or {})
    return param.knob in ((settings.get("layers") or {}).get(param.layer) or {})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b))
    return str(a) == str(b)


def _plain(value: Any) -> Any:
    """A CSV cell as a plain Python value; NaN/None -> None; 4.0 -> 4."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _scale(trials: pd.DataFrame, columns: list[str]) -> list[Any]:
    seen: set[Any] = set()
    for col in columns:
        if col in trials.columns:
            seen.update(v for v in (_plain(x) for x in trials[col].tolist()) if v is not None)
    values = list(seen)
    if _all_numbers(values):
        return sorted(values)
    return sorted(values, key=lambda v: natural_key(str(v)))


def _all_numbers(values: list[Any]) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
