"""The report's pictures, drawn with matplotlib's Agg canvas directly (no pyplot: no global backend switch, no
figures left open in a notebook that calls the report)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import blended_transform_factory

from autocompress.builtins import BUILTIN_COSTS
from autocompress.report.layers import LayerPicture, Panel, format_value
from autocompress.report.rundata import RunData

WITHIN = "#3b75af"
OVER = "#a9a9a9"
FRONT = "#f28e2b"
BUDGET = "#c0392b"
FAILED = "#c0392b"
STOPPED = "#8e6c8a"
UNCHANGED = "#eeeeee"
DPI = 160  # rendered at 1.6x the displayed size (100 CSS px per inch), so it stays sharp on dense screens
DISPLAY_PX_PER_INCH = 100

#: the axis label of each builtin cost's trade-off plot (the costs' own labels, autocompress/builtins.py)
_COST_LABEL = {c.column: c.axis_label for c in BUILTIN_COSTS.values()}
_RUG_Y = 0.035  # axes fraction where trials without an accuracy are drawn


@dataclass(frozen=True)
class Picture:
    png: bytes
    caption: str
    width: int  # CSS pixels to display it at


def render(fig: Figure, caption: str) -> Picture:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return Picture(buf.getvalue(), caption, round(fig.get_figwidth() * DISPLAY_PX_PER_INCH))


def tradeoff_figure(run: RunData, cost: str) -> Figure | None:
    """Validation accuracy against ``cost`` for every trial that measured it; None when none did."""
    t = run.trials
    x = pd.to_numeric(t[cost], errors="coerce")
    acc = t["val_accuracy"] * 100
    measured = x.notna()
    if not measured.any():
        return None
    budgeted = cost == run.metric and math.isfinite(run.limit)
    fig = Figure(figsize=(5.6, 4.9), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rug = blended_transform_factory(ax.transData, ax.transAxes)
    with_acc = measured & acc.notna()
    within = with_acc & t["feasible"]
    if (with_acc & ~within).any():
        ax.scatter(x[with_acc & ~within], acc[with_acc & ~within], s=22, color=OVER, label="over budget", zorder=2)
    if within.any():
        ax.scatter(x[within], acc[within], s=26, color=WITHIN, alpha=0.85, label="within budget", zorder=3)
    no_acc = measured & acc.isna() & (t["state"] != "FAIL")
    if no_acc.any():
        _rug_band(ax)
        ax.scatter(x[no_acc], np.full(int(no_acc.sum()), _RUG_Y), transform=rug, marker="x", s=22, color=OVER,
                   label="over budget: accuracy not measured", zorder=2)
    _draw_front(ax, run, cost, connect=cost == run.metric)
    base = run.baseline
    if "val_accuracy" in base:
        ax.axhline(base["val_accuracy"] * 100, color="0.35", ls=":", lw=1, zorder=1,
                   label=f"uncompressed val accuracy ({base['val_accuracy'] * 100:.2f}%)")
    right = float(np.nanmax(x[measured]))
    if budgeted:
        right = max(right, run.limit)
    ax.set_xlim(0, right * 1.08)
    if budgeted:
        ax.axvline(run.limit, color=BUDGET, ls="--", lw=1.4, zorder=1)
        ax.axvspan(run.limit, right * 1.08, color=BUDGET, alpha=0.05, zorder=0)
        ax.annotate(f"budget {run.budget}\n≤ {run.limit:.3g} {run.unit}", (run.limit, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(4, -4), textcoords="offset points", va="top",
                    fontsize=8, color=BUDGET)
    _set_accuracy_limits(ax, acc[with_acc], base.get("val_accuracy"))
    _draw_baselines(ax, t, x, acc, rug)
    base_cost = base.get(cost)
    if base_cost and math.isfinite(base_cost):
        top = ax.secondary_xaxis("top", functions=(lambda v: v / base_cost, lambda r: r * base_cost))
        top.set_xlabel("× uncompressed", fontsize=8, color="0.35")
        top.tick_params(labelsize=8, colors="0.35")
    ax.set_xlabel(_cost_label(run, cost))
    ax.set_ylabel(f"validation {run.score_name} (%)")
    ax.grid(alpha=0.25)
    _legend_below(fig, ax)
    return fig


def best_so_far_figure(run: RunData) -> Figure | None:
    """The best validation accuracy within budget after each trial, over every trial's outcome."""
    t = run.trials.sort_values("number", kind="stable")
    if t.empty:
        return None
    n = t["number"].astype(float).to_numpy()
    acc = (t["val_accuracy"] * 100).to_numpy(dtype=float)
    feasible = t["feasible"].to_numpy(dtype=bool) & ~np.isnan(acc)
    best = pd.Series(np.where(feasible, acc, np.nan)).cummax().ffill().to_numpy()
    fig = Figure(figsize=(11.2, 3.9), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rug = blended_transform_factory(ax.transData, ax.transAxes)
    labels = t["baseline"].astype(str).to_numpy()
    enqueued = n[labels != ""]
    if len(enqueued):
        ax.axvspan(enqueued.min() - 0.5, enqueued.max() + 0.5, color="0.9", zorder=0)
        ax.annotate("baselines", (enqueued.min() - 0.4, 1.0), xycoords=("data", "axes fraction"), xytext=(0, -3),
                    textcoords="offset points", va="top", fontsize=7.5, color="0.4")
    other = ~feasible & ~np.isnan(acc)
    if other.any():
        ax.scatter(n[other], acc[other], s=18, color=OVER, label="over budget", zorder=2)
    if feasible.any():
        ax.scatter(n[feasible], acc[feasible], s=22, color=WITHIN, alpha=0.8, label="within budget", zorder=3)
    if np.isnan(acc).any():
        _rug_band(ax)
    if not np.isnan(best).all():
        ax.step(n, best, where="post", color="#1d3f66", lw=2, label="best within budget so far", zorder=4)
    state = t["state"].astype(str).to_numpy()
    for mask, marker, color, label in (
        (np.isnan(acc) & (state == "COMPLETE"), "x", OVER, "over budget: accuracy not measured"),
        (state == "PRUNED", "v", STOPPED, "stopped early"),
        (state == "FAIL", "X", FAILED, "failed"),
    ):
        if mask.any():
            ax.scatter(n[mask], np.full(int(mask.sum()), _RUG_Y), transform=rug, marker=marker, s=26, color=color,
                       label=label, zorder=3)
    if "val_accuracy" in run.baseline:
        ax.axhline(run.baseline["val_accuracy"] * 100, color="0.35", ls=":", lw=1, label="uncompressed", zorder=1)
    _set_accuracy_limits(ax, pd.Series(acc[~np.isnan(acc)]), run.baseline.get("val_accuracy"))
    ax.set_xlim(n.min() - 0.8, n.max() + 0.8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {run.score_name} (%)")
    ax.grid(alpha=0.25)
    _legend_below(fig, ax)
    return fig


def policy_figure(picture: LayerPicture) -> Figure | None:
    """One panel per technique knob; rows are blocks, columns sub-layers; grey cells are left unchanged."""
    panels = [p for p in picture.panels if p.cells]
    if not panels:
        return None
    widths = [max(1, len(p.columns)) * (1.05 if len(p.columns) > 1 else 1.15) for p in panels]
    gap, left, right, top, bottom, row_h = 0.3, 1.2, 0.2, 0.7, 0.5, 0.34
    fig_w = left + sum(widths) + gap * (len(panels) - 1) + right
    fig_h = top + row_h * len(picture.rows) + bottom
    fig = Figure(figsize=(max(fig_w, 5.5), fig_h), dpi=DPI)
    scale_w = max(fig_w, 5.5)
    x0 = left
    for i, (panel, width) in enumerate(zip(panels, widths)):
        ax = fig.add_axes((x0 / scale_w, bottom / fig_h, width / scale_w, row_h * len(picture.rows) / fig_h))
        _draw_panel(ax, panel, picture, show_rows=i == 0)
        x0 += width + gap
    notes = ["grey: unchanged (as in the uncompressed model)"]
    if any(c.simulated for p in panels for c in p.cells.values()):
        notes.append("* simulated: no real kernel here, counts for memory only")
    if picture.options:
        notes.append("global: " + ", ".join(f"{k}={format_value(c.value)}" for k, c in picture.options.items()))
    fig.text(left / scale_w, 0.12 / fig_h, "    ".join(notes), fontsize=8, color="0.3", va="bottom")
    return fig


def _draw_panel(ax: Any, panel: Panel, picture: LayerPicture, show_rows: bool) -> None:
    cols = panel.columns or [""]
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(picture.rows), 0)
    ax.set_xticks([i + 0.5 for i in range(len(cols))])
    ax.set_xticklabels([c or "block" for c in cols] if panel.columns != [""] else [""], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_yticks([i + 0.5 for i in range(len(picture.rows))])
    ax.set_yticklabels(picture.rows if show_rows else [], fontsize=8.5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(panel.key, fontsize=10, fontweight="bold", pad=18 if panel.columns != [""] else 8)
    colour = _colour_map(panel)
    for r, row in enumerate(picture.rows):
        for key, cell in panel.cells.items():
            if key[0] != row:
                continue
            x, w = (0, len(cols)) if key[1] is None else (cols.index(key[1]), 1)
            face = colour(cell.value) if cell.changed else UNCHANGED
            ax.add_patch(Rectangle((x + 0.04, r + 0.06), w - 0.08, 0.88, facecolor=face, edgecolor="white",
                                   hatch="///" if cell.simulated else None, lw=0))
            text = format_value(cell.value) + ("*" if cell.simulated else "")
            ax.text(x + w / 2, r + 0.5, text, ha="center", va="center", fontsize=8,
                    color=_ink(face) if cell.changed else "0.55")


def _colour_map(panel: Panel):
    if panel.numeric and len(panel.scale) > 1:
        norm = Normalize(min(panel.scale), max(panel.scale))
        cmap = colormaps["YlGnBu"]
        return lambda v: cmap(0.15 + 0.7 * norm(float(v)))
    palette = colormaps["Set2"].colors
    index = {str(v): i for i, v in enumerate(panel.scale)}
    return lambda v: palette[index.get(str(v), 0) % len(palette)]


def _ink(face: Any) -> str:
    r, g, b = to_rgb(face)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _draw_front(ax: Any, run: RunData, cost: str, connect: bool) -> None:
    front = run.pareto
    if front.empty or cost not in front.columns:
        return
    fx = pd.to_numeric(front[cost], errors="coerce")
    fy = pd.to_numeric(front["val_accuracy"], errors="coerce") * 100
    if connect:
        order = np.argsort(fx.to_numpy())
        ax.step(fx.to_numpy()[order], fy.to_numpy()[order], where="post", color=FRONT, lw=1.6, zorder=4)
    label = "Pareto front" if connect else f"Pareto front (on {run.cost_name})"
    ax.scatter(fx, fy, s=70, color=FRONT, edgecolor="black", lw=0.8, label=label, zorder=5)
    best_x, best_y = float(fx.iloc[0]), float(fy.iloc[0])
    ax.annotate(f"chosen: trial {int(front['number'].iloc[0])}", (best_x, best_y), xytext=(8, 8),
                textcoords="offset points", fontsize=8, fontweight="bold",
                arrowprops=dict(arrowstyle="-", color="0.3", lw=0.8))


def _draw_baselines(ax: Any, t: pd.DataFrame, x: pd.Series, acc: pd.Series, rug: Any) -> None:
    """Mark the enqueued baselines; baselines at (nearly) the same spot share one label instead of overprinting."""
    first = {"uncompressed": True, "uniform": True}
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    labels: list[list[Any]] = []  # [x fraction, y fraction, texts, anchor x, anchor y, transform, colour, has_acc]
    for i in t.index[(t["baseline"] != "") & x.notna()]:
        label = str(t.at[i, "baseline"])
        kind = "uncompressed" if label == "uncompressed" else "uniform"
        marker, size, color = ("*", 190, "black") if kind == "uncompressed" else ("D", 46, "#6a3d9a")
        has_acc = not math.isnan(acc[i])
        y, transform = (acc[i], ax.transData) if has_acc else (_RUG_Y, rug)
        legend = {"uncompressed": "uncompressed model", "uniform": "uniform baselines"}[kind] if first[kind] else None
        first[kind] = False
        ax.scatter([x[i]], [y], transform=transform, marker=marker, s=size, facecolor="none" if kind == "uniform" else color,
                   edgecolor=color, lw=1.3, zorder=6, label=legend)
        fx, fy = (x[i] - x0) / (x1 - x0), ((y - y0) / (y1 - y0)) if has_acc else _RUG_Y
        near = next((lab for lab in labels if abs(lab[0] - fx) < 0.04 and abs(lab[1] - fy) < 0.04), None)
        if near is not None:
            near[2].append(_short(label))
        else:
            labels.append([fx, fy, [_short(label)], x[i], y, transform, color, has_acc])
    for _, _, texts, lx, ly, transform, color, has_acc in labels:
        note = ax.annotate(", ".join(texts), (lx, ly), xycoords=transform, xytext=(5, -10 if has_acc else 6),
                           textcoords="offset points", fontsize=7, color=color)
        note.set_in_layout(False)  # a long label near the edge must not squeeze the axes to nothing


def _short(label: str) -> str:
    """'uniform quantization.format=bf16' -> 'all format=bf16'; a composed baseline by its size:
    'composed: bf16 everywhere + pruning.mlp=0.25 + lowrank.rank=0.25' -> 'composed (3)'."""
    if label.startswith("composed: "):
        return f"composed ({label.count(' + ') + 1})"
    if not label.startswith("uniform "):
        return label
    setting = label[len("uniform "):]
    name, eq, value = setting.partition("=")
    return f"all {name.rpartition('.')[2]}={value}" if eq else label


def _rug_band(ax: Any) -> None:
    """The strip at the bottom where trials without an accuracy sit, set apart so no one reads a value there."""
    ax.add_patch(Rectangle((0, 0), 1, 2 * _RUG_Y, transform=ax.transAxes, color="0.5", alpha=0.1, lw=0, zorder=0))
    ax.text(0.005, 2 * _RUG_Y, "no accuracy", transform=ax.transAxes, ha="left", va="bottom", fontsize=6.5,
            color="0.45")


def _legend_below(fig: Figure, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ncol = 2 if fig.get_figwidth() < 7 else 4
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=7.5, frameon=False)


def _set_accuracy_limits(ax: Any, acc: pd.Series, base: float | None) -> None:
    """Zoom on the measured accuracies and the uncompressed one, leaving room for the no-accuracy strip."""
    values = [float(v) for v in acc] + ([base * 100] if base is not None and math.isfinite(base) else [])
    if not values:
        ax.set_ylim(0, 100)
        return
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1.0)
    ax.set_ylim(max(0.0, lo - 0.35 * span), min(100.0, hi + 0.25 * span))


def _cost_label(run: RunData, cost: str) -> str:
    label = _COST_LABEL.get(cost, cost)
    target = run.config.get("target") or {}
    if cost == "latency_ms" and target:
        label += f" — batch {target.get('batch_size', '?')}, {target.get('threads', '?')} threads"
    return label
