"""The HTML page: one self-contained file (styles inline, pictures embedded as base64 PNG), so the run directory
can be copied, mailed or served anywhere and the page still shows everything.

The markup and the words are in ``templates/report.html.j2`` (Jinja2, autoescaped: a layer name or an error message
is never read as HTML); this module only prepares what the page shows, with every number formatted here.
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from datetime import datetime
from functools import cache
from typing import Any

import jinja2
import pandas as pd

from autocompress import rundir
from autocompress.report.layers import LayerPicture, format_value
from autocompress.report.plots import Picture
from autocompress.report.rundata import RunData
from autocompress.results import timing_drift
from autocompress.rundir import RunDir

TEMPLATE = "report.html.j2"
OUTCOME_KINDS = ("within budget", "over budget", "stopped early", "failed")  # in the order the page counts them


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("autocompress.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_page(run: RunData, figures: dict[str, Picture], picture: LayerPicture | None) -> str:
    """The whole page; ``figures`` maps a figure id to its picture (absent: nothing to draw yet)."""
    t = run.trials
    return _environment().get_template(TEMPLATE).render(
        name=run.run_dir.resolve().name,
        subtitle=_subtitle(run),
        score=run.score_name,
        finished=run.finished,
        progress=None if run.finished else {
            "trials": len(t), "planned": run.planned_trials,
            "where": f"read from the Optuna storage {rundir.STUDY}" if run.source == rundir.STUDY else "no finished trial yet"},
        best=_best(run),
        none_met=_none_met(run) if not run.feasible and (len(t) or run.finished) else None,
        drift=timing_drift(t, run.baseline.get("latency_ms", math.nan)),
        cards=_cards(run),
        figures={fid: {"data": base64.b64encode(pic.png).decode("ascii"), "width": pic.width, "caption": pic.caption}
                 for fid, pic in figures.items()},
        policy=_policy(run, picture),
        # with the latency model on, the Pareto table shows the prediction next to the measurement it was checked by
        predicted="predicted_latency_ms" in run.pareto and bool(
            pd.to_numeric(run.pareto["predicted_latency_ms"], errors="coerce").notna().any()),
        pareto=[_pareto_row(row, run) for _, row in run.pareto.iterrows()],
        # a search in another runtime re-times its front there at the end, with torch eager's time beside it
        retimed=(run.config.get("target") or {}).get("runtime") if "latency_ms_final" in run.pareto else None,
        baselines=[_baseline_row(row) for _, row in (t[t["baseline"] != ""] if len(t) else t).iterrows()],
        outcomes=_outcomes(run),
        phases=[{"name": name, "seconds": f"{seconds:.0f}"} for name, seconds in run.phases.items()],
        slow=[{"choice": label, "ratio": f"{ratio:.1f}x"} for label, ratio in run.slow_choices.items()],
        solver=[] if run.solver is None else [
            {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
            for row in run.solver.to_dict("records")],
        about={"files": sorted(p.name for p in run.run_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
               "source": run.source, "run_dir": str(run.run_dir), "notes": run.notes,
               "generated": datetime.now().strftime("%Y-%m-%d %H:%M")},
    )


# --- header -------------------------------------------------------------------------------------------------------


def _subtitle(run: RunData) -> str:
    model = (run.config.get("model") or {}).get("name") or "model"
    bits = [model]
    if run.budget is not None:
        limit = f" ({run.metric} ≤ {run.limit:.4g})" if math.isfinite(run.limit) else ""
        bits.append(f"budget {run.budget}{limit}")
    target = run.config.get("target") or {}
    if target:
        runtime = target.get("runtime") or "torch"
        where = "" if runtime == "torch" else f" in {runtime}"
        bits.append(f"measured{where} at batch {target.get('batch_size')}, {target.get('threads')} threads")
    search = run.config.get("search") or {}
    if search:
        bits.append(f"{search.get('sampler', '?')} sampler, seed {search.get('seed', '?')}")
    return " · ".join(bits)


def _best(run: RunData) -> dict[str, Any] | None:
    if not run.feasible:
        return None
    best = run.best
    return {"number": int(best["number"]), "val": _pct(best["val_accuracy"]), "drop": _drop(run, best),
            "latency": _num(best.get("latency_ms"), 2), "speedup": _x(best.get("speedup")),
            "memory": _num(best.get("memory_mb"), 3), "simulated": bool(best.get("simulated"))}


def _none_met(run: RunData) -> dict[str, Any]:
    """What the search came closest to, for the statement that no policy met the budget."""
    closest = None
    costs = pd.to_numeric(run.trials.get(run.metric), errors="coerce") if len(run.trials) else pd.Series(dtype=float)
    if costs.notna().any() and math.isfinite(run.limit):
        i = costs.idxmin()
        closest = {"cost": run.cost_name, "value": f"{costs[i]:.4g}", "unit": run.unit,
                   "trial": int(run.trials.at[i, "number"]), "ratio": f"{costs[i] / run.limit:.2f}"}
    return {"budget": f"the budget {run.budget}" if run.budget is not None else "the budget",
            "limit": f" ({run.metric} ≤ {run.limit:.4g})" if math.isfinite(run.limit) else "",
            "trials": len(run.trials), "closest": closest}


def _cards(run: RunData) -> list[dict[str, Any]]:
    base = run.baseline
    t = run.trials
    cards = []
    if base:
        cards.append(_card("Uncompressed", f"{_pct(base.get('val_accuracy'))} val",
                           f"test {_pct(base.get('test_accuracy'))}",
                           f"{_num(base.get('latency_ms'), 2)} ms · {_num(base.get('memory_mb'), 3)} MB"))
    if run.budget is not None:
        cards.append(_card("Budget", str(run.budget), f"{run.metric} ≤ {_num(run.limit, 4)}"))
    if run.feasible:
        best = run.best
        cards.append(_card(f"Chosen: trial {int(best['number'])}", f"{_pct(best['val_accuracy'])} val",
                           f"test {_pct(best.get('test_accuracy'))}",
                           f"{_x(best.get('speedup'))} faster · {_num(best.get('memory_mb'), 3)} MB"))
    states = Counter(t["state"]) if len(t) else Counter()
    planned = f" of {run.planned_trials}" if run.planned_trials else ""
    skipped = int(((t["skipped"] != "") & (t["state"] == "COMPLETE")).sum()) if len(t) else 0
    seconds = float(pd.to_numeric(t.get("duration_s"), errors="coerce").sum()) if len(t) else 0.0
    feasible = int(t["feasible"].sum()) if len(t) else 0
    cards.append(_card("Trials", f"{len(t)}{planned}", f"{feasible} within budget · {skipped} over budget",
                       f"{states.get('FAIL', 0)} failed · {states.get('PRUNED', 0)} stopped early"
                       f" · {_duration(seconds)}"))
    return cards


def _card(title: str, big: str, *lines: str) -> dict[str, Any]:
    return {"title": title, "big": big, "lines": lines}


# --- policy and tables ----------------------------------------------------------------------------------------------


def _policy(run: RunData, picture: LayerPicture | None) -> dict[str, Any] | None:
    """None: no policy was chosen; ``trial`` None: the chosen one is the uncompressed model."""
    if not run.feasible:
        return None
    if picture is None:
        return {"trial": None}
    settings = []
    for panel in picture.panels:
        for (row, col), cell in panel.cells.items():
            settings.append({"layer": row if col is None else (f"{row}.{col}" if col else row), "knob": panel.key,
                             "value": format_value(cell.value) + (" (simulated)" if cell.simulated else ""),
                             "changed": cell.changed})
    return {"trial": picture.trial, "settings": settings,
            "options": [(key, format_value(cell.value)) for key, cell in picture.options.items()],
            "file": rundir.BEST_POLICY if run.finished and RunDir(run.run_dir).has(rundir.BEST_POLICY) else None}


def _pareto_row(row: pd.Series, run: RunData) -> dict[str, Any]:
    test, base_test = row.get("test_accuracy"), run.baseline.get("test_accuracy")
    mem, base_mem = row.get("memory_mb"), run.baseline.get("memory_mb")
    return {
        "number": int(row["number"]), "val": _pct(row["val_accuracy"]), "test": _pct(test),
        "gain": _num((test - base_test) * 100 if _finite(test) and _finite(base_test) else None, 2, signed=True),
        "latency": _num(row.get("latency_ms"), 2), "predicted": _num(row.get("predicted_latency_ms"), 2),
        "final": _num(row.get("latency_ms_final"), 2), "torch": _num(row.get("latency_ms_torch"), 2),
        "speedup": _x(row.get("speedup")), "memory": _num(mem, 3),
        "of_uncompressed": _pct(mem / base_mem if _finite(mem) and base_mem else None, 0),
        "policy": str(row.get("policy") or ""), "baseline": str(row.get("baseline") or ""),
        "simulated": simulated_formats(row, run),
    }


def _baseline_row(row: pd.Series) -> dict[str, Any]:
    return {"number": int(row["number"]), "baseline": row["baseline"], "val": _pct(row["val_accuracy"]),
            "latency": _num(row.get("latency_ms"), 2), "speedup": _x(row.get("speedup")),
            "memory": _num(row.get("memory_mb"), 3), "outcome": _outcome(row)}


def _outcomes(run: RunData) -> dict[str, Any] | None:
    t = run.trials
    if t.empty:
        return None
    counts = Counter(_outcome_kind(row) for _, row in t.iterrows())
    reasons: dict[tuple[str, str], list[int]] = {}
    for _, row in t.iterrows():
        kind = _outcome_kind(row)
        if kind == "within budget":
            continue
        reason = row["error"] if kind == "failed" else (row["skipped"] or f"{run.metric} over the limit")
        reasons.setdefault((kind, _clip(reason, 300)), []).append(int(row["number"]))
    return {
        "counts": [(k, counts[k]) for k in OUTCOME_KINDS if counts.get(k)],
        "reasons": [{"kind": kind, "count": len(nums), "reason": reason, "numbers": _numbers(nums)}
                    for (kind, reason), nums in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
    }


# --- cells ----------------------------------------------------------------------------------------------------------


def simulated_formats(row: pd.Series, run: RunData) -> str:
    """'int4_weight ×3, int2_weight ×1' from the row's simulated layers and their parameter values."""
    entries = str(row.get("simulated") or "").split()
    if not entries:
        return ""
    counts: Counter[str] = Counter()
    for entry in entries:
        layer, _, technique = entry.rpartition(":")
        values = [format_value(row.get(p.name)) for p in run.params
                  if p.layer == layer and p.technique == technique and row.get(p.name) is not None]
        counts[" ".join(values) if values else technique] += 1
    return ", ".join(f"{v} ×{n}" for v, n in counts.most_common())


def _outcome_kind(row: pd.Series) -> str:
    if row["state"] == "FAIL":
        return "failed"
    if row["state"] == "PRUNED":
        return "stopped early"
    return "within budget" if row["feasible"] else "over budget"


def _outcome(row: pd.Series) -> str:
    kind = _outcome_kind(row)
    if kind == "failed":
        return f"failed: {_clip(row['error'], 120)}"
    if kind == "within budget":
        return kind
    return row["skipped"] or kind


def _numbers(nums: list[int]) -> str:
    return ", ".join(map(str, nums[:12])) + (f", … (+{len(nums) - 12})" if len(nums) > 12 else "")


def _clip(text: Any, n: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int, signed: bool = False) -> str:
    if not _finite(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pct(value: Any, digits: int = 2) -> str:
    return f"{value * 100:.{digits}f}%" if _finite(value) else "–"


def _x(value: Any) -> str:
    return f"{value:.2f}×" if _finite(value) else "–"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s of trials" if seconds < 120 else f"{seconds / 60:.1f} min of trials"


def _drop(run: RunData, best: pd.Series) -> str:
    """'-1.00': validation accuracy against the uncompressed model, in points; '' when either is unknown."""
    base = run.baseline.get("val_accuracy")
    if not _finite(base) or not _finite(best["val_accuracy"]):
        return ""
    return f"{(best['val_accuracy'] - base) * 100:+.2f}"
