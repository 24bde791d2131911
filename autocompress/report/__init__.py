"""The report of a run: ``report.html`` (self-contained) plus its pictures as PNG files under ``plots/``.

It is built from the run directory alone (``trials.csv``, ``pareto.csv``, ``baseline.yaml``, ``config.yaml``,
``best_policy.yaml``; ``study.db`` for a run that has not finished), so it can be regenerated anywhere the folder is
copied to: ``autocompress report RUN_DIR``. The search writes it when it ends.

- A run still in progress (no ``trials.csv`` yet, or the Optuna storage holds more finished trials than it) is
  reported from ``study.db``: what has finished so far, marked "In progress", without test accuracy.
- A run without a feasible policy says so plainly at the top, with how close the search came.
"""

from __future__ import annotations

from pathlib import Path

from autocompress import rundir
from autocompress.io import atomic_write_bytes, atomic_write_text
from autocompress.report.layers import LayerPicture, layer_picture
from autocompress.report.page import render_page
from autocompress.report.plots import Picture, best_so_far_figure, policy_figure, render, tradeoff_figure
from autocompress.report.rundata import RunData, load_run
from autocompress.rundir import RunDir

__all__ = ["write_report", "load_run", "RunData", "LayerPicture", "layer_picture", "REPORT_FILE", "PLOTS_DIR"]

REPORT_FILE = rundir.REPORT
PLOTS_DIR = rundir.PLOTS

#: figure id in the page -> PNG file name under plots/
PLOT_FILES = {
    "plot-accuracy-latency": "accuracy_vs_latency.png",
    "plot-accuracy-memory": "accuracy_vs_memory.png",
    "plot-best-so-far": "best_so_far.png",
    "plot-policy": "chosen_policy_layers.png",
}


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and ``run_dir/plots/*.png``; returns the page's path.

    Raises :class:`autocompress.errors.InputError` when ``run_dir`` holds no run.
    """
    run = load_run(run_dir)
    picture = layer_picture(run)
    figures: dict[str, Picture] = {}
    drawn = {
        "plot-accuracy-latency": (tradeoff_figure(run, "latency_ms"), _tradeoff_caption(run, "latency")),
        "plot-accuracy-memory": (tradeoff_figure(run, "memory_mb"), _tradeoff_caption(run, "memory")),
        "plot-best-so-far": (best_so_far_figure(run), f"Best validation {run.score_name} within budget after each "
                             f"trial; markers at the bottom are trials without a score (over budget, stopped, failed)."),
        "plot-policy": (policy_figure(picture) if picture is not None else None,
                        f"Trial {picture.trial if picture else '?'}: the setting of every searched layer, one panel "
                        "per technique knob; grey cells are left as in the uncompressed model."),
    }
    plots = RunDir(run.run_dir).plots
    for fid, (fig, caption) in drawn.items():
        target = plots / PLOT_FILES[fid]
        if fig is None:
            target.unlink(missing_ok=True)  # a stale picture from an earlier report must not linger
            continue
        figures[fid] = render(fig, caption)
        atomic_write_bytes(target, figures[fid].png)
    page = RunDir(run.run_dir).report
    atomic_write_text(page, render_page(run, figures, picture))
    return page


def _tradeoff_caption(run: RunData, cost: str) -> str:
    budgeted = run.cost_name == cost
    text = (f"Validation {run.score_name} against measured {cost} for every trial. Orange: the Pareto front within "
            "budget" + (" (the dashed line is the budget)." if budgeted else f" (chosen on {run.cost_name})."))
    return text + " Star: the uncompressed model; diamonds: uniform policies."
