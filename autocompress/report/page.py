"""The HTML page: one self-contained file (styles inline, pictures embedded as base64 PNG), so the run directory
can be copied, mailed or served anywhere and the page still shows everything."""

from __future__ import annotations

import base64
import math
from collections import Counter
from datetime import datetime
from html import escape
from typing import Any, Iterable

import pandas as pd

from autocompress.report.layers import LayerPicture, format_value
from autocompress.report.plots import UNITS, Picture
from autocompress.report.rundata import RunData
from autocompress.results import timing_drift

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;border-bottom:1px solid #e3e3e3;padding-bottom:4px}
.sub{color:#666;margin:0 0 16px}
.verdict{font-size:17px;padding:12px 16px;border-radius:6px;margin:12px 0 18px}
.verdict.ok{background:#eaf4ea;border-left:5px solid #3a8a3a}
.verdict.none{background:#fdecea;border-left:5px solid #c0392b}
.verdict.progress{background:#fff6e0;border-left:5px solid #e0a800}
.verdict.warn{background:#fff6e0;border-left:5px solid #b35900;font-size:15px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:12px;margin:10px 0}
.card{border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px}
.card h3{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:#777;margin:0 0 4px}
.card .big{font-size:20px;font-weight:600}.card div{font-size:13.5px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:16px}
figure{margin:0 0 8px}figure img{max-width:100%;height:auto;border:1px solid #eee;border-radius:4px}
figcaption{font-size:13px;color:#555;margin-top:4px}
table{border-collapse:collapse;font-size:13.5px;margin:8px 0;width:100%}
th,td{padding:5px 9px;border-bottom:1px solid #e8e8e8;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#fff3e6;font-weight:600}
.sim{color:#a15c00}.muted{color:#888}.small{font-size:12.5px}
code{background:#f3f4f6;padding:1px 4px;border-radius:3px;font-size:90%}
details{margin:8px 0}summary{cursor:pointer;color:#444}
"""


def render_page(run: RunData, figures: dict[str, Picture], picture: LayerPicture | None) -> str:
    """The whole page; ``figures`` maps a figure id to its picture (absent: nothing to draw yet)."""
    name = run.run_dir.resolve().name
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>autocompress report: {escape(name)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Compression report: {escape(name)}</h1>",
        f'<p class="sub">{escape(_subtitle(run))}</p>',
        _verdict(run),
        _cards(run),
        '<h2 id="tradeoff">Accuracy against cost</h2>',
        '<div class="plots">',
        _figure(figures, "plot-accuracy-latency"),
        _figure(figures, "plot-accuracy-memory"),
        "</div>",
        '<h2 id="progress">Best within budget, trial by trial</h2>',
        _figure(figures, "plot-best-so-far"),
        '<h2 id="policy">The chosen policy, layer by layer</h2>',
        _policy(run, figures, picture),
        '<h2 id="pareto-set">Pareto set (within budget)</h2>',
        _pareto_table(run),
        '<h2 id="baselines">Baselines</h2>',
        _baselines_table(run),
        '<h2 id="outcomes">Trial outcomes</h2>',
        _outcomes(run),
        _footer(run),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


# --- header -------------------------------------------------------------------------------------------------------


def _subtitle(run: RunData) -> str:
    model = (run.config.get("model") or {}).get("name") or "model"
    bits = [model]
    if run.budget is not None:
        limit = f" ({run.metric} ≤ {run.limit:.4g})" if math.isfinite(run.limit) else ""
        bits.append(f"budget {run.budget}{limit}")
    target = run.config.get("target") or {}
    if target:
        bits.append(f"measured at batch {target.get('batch_size')}, {target.get('threads')} threads")
    search = run.config.get("search") or {}
    if search:
        bits.append(f"{search.get('sampler', '?')} sampler, seed {search.get('seed', '?')}")
    return " · ".join(bits)


def _verdict(run: RunData) -> str:
    n = len(run.trials)
    planned = run.planned_trials
    lines = []
    if not run.finished:
        of = f" of {planned}" if planned else ""
        where = "read from the Optuna storage study.db" if run.source == "study.db" else "no finished trial yet"
        lines.append(
            f'<p class="verdict progress" id="in-progress"><strong>In progress:</strong> this run has not finished '
            f"(still running, or stopped before the end: continue it with <code>autocompress search … --resume</code>). "
            f"{n}{of} trials so far, {where}. Test accuracy is measured only when the search ends.</p>"
        )
    if run.feasible:
        best = run.best
        text = (f"Best within budget: trial {int(best['number'])}, validation accuracy {_pct(best['val_accuracy'])}"
                f"{_drop(run, best)}, {_num(best.get('latency_ms'), 2)} ms ({_x(best.get('speedup'))} faster), "
                f"{_num(best.get('memory_mb'), 3)} MB.")
        if best.get("simulated"):
            text += " It uses simulated formats (no real kernel: they save memory, not time)."
        lines.append(f'<p class="verdict ok" id="verdict">{escape(text)}</p>')
    elif n or run.finished:
        lines.append(f'<p class="verdict none" id="verdict">{escape(_no_feasible_statement(run))}</p>')
    drift = timing_drift(run.trials, run.baseline.get("latency_ms", math.nan))
    if drift:
        lines.append(f'<p class="verdict warn" id="timing-drift"><strong>Timings unstable:</strong> {escape(drift)}.</p>')
    return "\n".join(lines)


def _no_feasible_statement(run: RunData) -> str:
    budget = f"the budget {run.budget}" if run.budget is not None else "the budget"
    limit = f" ({run.metric} ≤ {run.limit:.4g})" if math.isfinite(run.limit) else ""
    text = f"No policy met {budget}{limit} in {len(run.trials)} trials"
    text += "." if run.finished else " so far."
    costs = pd.to_numeric(run.trials.get(run.metric), errors="coerce") if len(run.trials) else pd.Series(dtype=float)
    if costs.notna().any() and math.isfinite(run.limit):
        i = costs.idxmin()
        text += (f" The lowest {run.metric.split('_')[0]} measured was {costs[i]:.4g} {UNITS[run.metric]} "
                 f"(trial {int(run.trials.at[i, 'number'])}), {costs[i] / run.limit:.2f}× the limit.")
    return text


def _cards(run: RunData) -> str:
    base = run.baseline
    t = run.trials
    cards = []
    if base:
        cards.append(_card("Uncompressed", f"{_pct(base.get('val_accuracy'))} val",
                           [f"test {_pct(base.get('test_accuracy'))}",
                            f"{_num(base.get('latency_ms'), 2)} ms · {_num(base.get('memory_mb'), 3)} MB"]))
    if run.budget is not None:
        cards.append(_card("Budget", str(run.budget), [f"{run.metric} ≤ {_num(run.limit, 4)}"]))
    if run.feasible:
        best = run.best
        cards.append(_card(f"Chosen: trial {int(best['number'])}", f"{_pct(best['val_accuracy'])} val",
                           [f"test {_pct(best.get('test_accuracy'))}",
                            f"{_x(best.get('speedup'))} faster · {_num(best.get('memory_mb'), 3)} MB"]))
    states = Counter(t["state"]) if len(t) else Counter()
    planned = f" of {run.planned_trials}" if run.planned_trials else ""
    skipped = int(((t["skipped"] != "") & (t["state"] == "COMPLETE")).sum()) if len(t) else 0
    seconds = float(pd.to_numeric(t.get("duration_s"), errors="coerce").sum()) if len(t) else 0.0
    cards.append(_card("Trials", f"{len(t)}{planned}",
                       [f"{int(t['feasible'].sum()) if len(t) else 0} within budget · {skipped} over budget",
                        f"{states.get('FAIL', 0)} failed · {states.get('PRUNED', 0)} stopped early · {_duration(seconds)}"]))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _card(title: str, big: str, lines: Iterable[str]) -> str:
    body = "".join(f"<div>{escape(line)}</div>" for line in lines)
    return f'<div class="card"><h3>{escape(title)}</h3><div class="big">{escape(big)}</div>{body}</div>'


# --- figures and policy ---------------------------------------------------------------------------------------------


def _figure(figures: dict[str, Picture], fid: str) -> str:
    if fid not in figures:
        return f'<p class="muted" id="{fid}-missing">Nothing to plot yet.</p>'
    pic = figures[fid]
    data = base64.b64encode(pic.png).decode("ascii")
    return (f'<figure id="{fid}"><img src="data:image/png;base64,{data}" width="{pic.width}" '
            f'alt="{escape(pic.caption)}"><figcaption style="max-width:{pic.width}px">{escape(pic.caption)}'
            "</figcaption></figure>")


def _policy(run: RunData, figures: dict[str, Picture], picture: LayerPicture | None) -> str:
    if not run.feasible:
        return '<p id="no-policy">No policy was chosen: none met the budget.</p>'
    if picture is None:
        return '<p id="no-policy">The chosen policy has no searched settings (it is the uncompressed model).</p>'
    out = []
    if "plot-policy" in figures:
        out.append(_figure(figures, "plot-policy"))
    if picture.options:
        out.append('<p id="policy-options">Global settings: ' + ", ".join(
            f"<code>{escape(k)} = {escape(format_value(c.value))}</code>" for k, c in picture.options.items()) + "</p>")
    if run.finished and (run.run_dir / "best_policy.yaml").is_file():
        out.append('<p class="small">The policy as a file: <a href="best_policy.yaml">best_policy.yaml</a> '
                   "(rebuild the model with <code>autocompress apply</code>).</p>")
    rows = []
    for panel in picture.panels:
        for (row, col), cell in panel.cells.items():
            layer = row if col is None else (f"{row}.{col}" if col else row)
            rows.append((layer, panel.key, format_value(cell.value) + (" (simulated)" if cell.simulated else ""),
                         "" if cell.changed else "unchanged"))
    body = "".join(f"<tr><td><code>{escape(a)}</code></td><td>{escape(b)}</td><td>{escape(c)}</td>"
                   f'<td class="muted">{escape(d)}</td></tr>' for a, b, c, d in rows)
    out.append(f'<details><summary>Every setting of trial {picture.trial} as a table</summary>'
               f'<table id="policy-settings"><thead><tr><th>layer</th><th>knob</th><th>value</th><th></th></tr></thead>'
               f"<tbody>{body}</tbody></table></details>")
    return "\n".join(out)


# --- tables ---------------------------------------------------------------------------------------------------------


def _pareto_table(run: RunData) -> str:
    if run.pareto.empty:
        return '<p id="pareto-empty">Empty: no trial met the budget.</p>'
    base_mem = run.baseline.get("memory_mb")
    # with the latency model on, the table shows the prediction next to the end-to-end measurement it was checked by
    predicted = "predicted_latency_ms" in run.pareto and bool(
        pd.to_numeric(run.pareto["predicted_latency_ms"], errors="coerce").notna().any())
    head = ("<tr><th class=num>trial</th><th class=num>val acc</th><th class=num>test acc</th>"
            "<th class=num>test vs uncompressed (points)</th><th class=num>latency ms (measured)</th>"
            + ("<th class=num>predicted ms</th>" if predicted else "") + "<th class=num>speedup</th>"
            "<th class=num>memory MB</th><th class=num>of uncompressed</th><th>policy</th><th>simulated formats</th></tr>")
    rows = []
    for i, row in run.pareto.iterrows():
        test = row.get("test_accuracy")
        base_test = run.baseline.get("test_accuracy")
        gain = (test - base_test) * 100 if _finite(test) and _finite(base_test) else None
        mem = row.get("memory_mb")
        sim = simulated_formats(row, run)
        rows.append(
            f'<tr data-trial="{int(row["number"])}"{" class=chosen" if i == 0 else ""}>'
            f'<td class=num>{int(row["number"])}</td><td class=num>{_pct(row["val_accuracy"])}</td>'
            f"<td class=num>{_pct(test)}</td><td class=num>{_num(gain, 2, signed=True)}</td>"
            f"<td class=num>{_num(row.get('latency_ms'), 2)}</td>"
            + (f"<td class=num>{_num(row.get('predicted_latency_ms'), 2)}</td>" if predicted else "")
            + f"<td class=num>{_x(row.get('speedup'))}</td>"
            f"<td class=num>{_num(mem, 3)}</td>"
            f"<td class=num>{_pct(mem / base_mem if _finite(mem) and base_mem else None, 0)}</td>"
            f"<td>{escape(str(row.get('policy') or ''))}{_baseline_tag(row)}</td>"
            f'<td class="sim">{escape(sim) if sim else "<span class=muted>none</span>"}</td></tr>'
        )
    note = ("" if run.finished else
            '<p class="small muted">Test accuracy is filled in when the search ends.</p>')
    return (f'<table id="pareto"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>{note}'
            '<p class="small muted">Highlighted: the chosen policy (best validation accuracy within budget). Speedup '
            "is against the uncompressed model measured at the start of the run. Simulated formats have no real kernel "
            "on this machine: they count for memory, never for speed.</p>")


def _baselines_table(run: RunData) -> str:
    t = run.trials
    rows = t[t["baseline"] != ""] if len(t) else t
    if rows.empty:
        return '<p class="muted">No baseline trials (search.baselines was off, or none has finished yet).</p>'
    out = []
    for _, row in rows.iterrows():
        outcome = _outcome(row)
        out.append(f'<tr data-trial="{int(row["number"])}"><td class=num>{int(row["number"])}</td>'
                   f"<td>{escape(row['baseline'])}</td><td class=num>{_pct(row['val_accuracy'])}</td>"
                   f"<td class=num>{_num(row.get('latency_ms'), 2)}</td><td class=num>{_x(row.get('speedup'))}</td>"
                   f"<td class=num>{_num(row.get('memory_mb'), 3)}</td><td>{escape(outcome)}</td></tr>")
    return ('<table id="baseline-trials"><thead><tr><th class=num>trial</th><th>baseline</th><th class=num>val acc</th>'
            "<th class=num>latency ms</th><th class=num>speedup</th><th class=num>memory MB</th><th>outcome</th></tr>"
            f'</thead><tbody>{"".join(out)}</tbody></table>')


def _outcomes(run: RunData) -> str:
    t = run.trials
    if t.empty:
        return '<p class="muted">No finished trial yet.</p>'
    counts = Counter(_outcome_kind(row) for _, row in t.iterrows())
    summary = ", ".join(f"{counts[k]} {k}" for k in ("within budget", "over budget", "stopped early", "failed")
                        if counts.get(k))
    reasons: dict[tuple[str, str], list[int]] = {}
    for _, row in t.iterrows():
        kind = _outcome_kind(row)
        if kind == "within budget":
            continue
        reason = row["error"] if kind == "failed" else (row["skipped"] or f"{run.metric} over the limit")
        reasons.setdefault((kind, _clip(reason, 300)), []).append(int(row["number"]))
    out = [f'<p id="outcome-counts">{escape(summary)}.</p>']
    if reasons:
        body = "".join(
            f'<tr><td>{escape(kind)}</td><td class=num>{len(nums)}</td><td>{escape(reason)}</td>'
            f'<td class="small">{escape(_numbers(nums))}</td></tr>'
            for (kind, reason), nums in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        )
        out.append('<table id="not-within-budget"><thead><tr><th>outcome</th><th class=num>trials</th>'
                   f"<th>reason</th><th>trial numbers</th></tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(out)


def _footer(run: RunData) -> str:
    files = sorted(p.name for p in run.run_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    notes = "".join(f"<li>{escape(n)}</li>" for n in run.notes)
    return (
        '<h2 id="about">About this report</h2>'
        f'<p class="small">Built from the run directory alone ({escape(", ".join(files))}); trials read from '
        f"{escape(run.source or 'nothing yet')}. Regenerate it with <code>autocompress report "
        f"{escape(str(run.run_dir))}</code>. Generated {datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>"
        + (f'<ul class="small muted">{notes}</ul>' if notes else "")
    )


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


def _baseline_tag(row: pd.Series) -> str:
    label = str(row.get("baseline") or "")
    return f' <span class="muted">({escape(label)})</span>' if label else ""


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
    base = run.baseline.get("val_accuracy")
    if not _finite(base) or not _finite(best["val_accuracy"]):
        return ""
    delta = (best["val_accuracy"] - base) * 100
    return f" ({delta:+.2f} points vs uncompressed)"
