"""The HTML report: written at the end of a real search, built from the run directory alone, honest about runs in
progress and runs with no feasible policy, and showing any technique's knobs in the per-layer picture."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

import autocompress
from autocompress.budget import Budget
from autocompress.cli import main
from autocompress.config import config_from_dict
from autocompress.data import Split
from autocompress.report import PLOT_FILES, load_run, write_report
from autocompress.report.layers import layer_picture
from autocompress.results import timing_drift, trials_frame
from autocompress.runner import Baseline

PLOT_IDS = ("plot-accuracy-latency", "plot-accuracy-memory", "plot-best-so-far", "plot-policy")


class Page(HTMLParser):
    """The parts of report.html a reader relies on, with a check that every tag that opens also closes."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: dict[str, dict[str, str]] = {}
        self.images: dict[str, str] = {}  # figure id -> img src
        self.links: list[str] = []
        self.table_rows: dict[str, list[dict[str, str]]] = {}
        self.order: list[str] = []  # ids and h1/h2 in document order
        self.text: dict[str, str] = {}
        self._figure: str | None = None
        self._table: str | None = None
        self._capture: list[tuple[str, int]] = []  # (id, depth) of the elements whose text is being read
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag not in self.VOID:
            self.stack.append(tag)
        if "id" in a:
            self.ids[a["id"]] = a
            self.order.append(a["id"])
            self.text.setdefault(a["id"], "")
            if tag not in self.VOID:
                self._capture.append((a["id"], len(self.stack)))
        if tag in ("h1", "h2"):
            self.order.append(tag)
        if tag == "figure":
            self._figure = a.get("id")
        if tag == "img" and self._figure:
            self.images[self._figure] = a.get("src", "")
        if tag in ("img", "script") and "src" in a:
            self.links.append(a["src"])
        if tag in ("a", "link") and "href" in a:
            self.links.append(a["href"])
        if tag == "table":
            self._table = a.get("id", "")
            self.table_rows[self._table] = []
        if tag == "tr" and self._table is not None and "data-trial" in a:
            self.table_rows[self._table].append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        self._capture = [(fid, depth) for fid, depth in self._capture if depth <= len(self.stack)]
        if tag == "figure":
            self._figure = None
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for fid, _ in self._capture:
            self.text[fid] += data

    def trials_in(self, table: str) -> list[int]:
        return [int(r["data-trial"]) for r in self.table_rows.get(table, [])]


def parse(path: Path) -> Page:
    page = Page(path.read_text())
    assert not page.errors, page.errors[:5]
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def embedded_png(page: Page, fid: str) -> bytes:
    src = page.images[fid]
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), f"{fid} is not embedded"
    return base64.b64decode(src[len(prefix):])


def assert_self_contained(page: Page, run_dir: Path) -> None:
    for link in page.links:
        assert link.startswith("data:") or (run_dir / link).is_file(), f"the page needs {link!r} from outside"


# --- a real search ---------------------------------------------------------------------------------------------------


def test_every_search_writes_a_report_with_each_plot_and_exactly_the_pareto_rows(tiny_config, tmp_path, capsys):
    # a memory budget makes feasibility exact (bytes, not timings): uniform bf16 halves the weights
    tiny_config.update(budget="memory=0.7x", search={"trials": 9, "sampler": "tpe", "seed": 0, "strategy": "sample"})
    logs: list[str] = []
    result = autocompress.search(config_from_dict(tiny_config), progress=False, log=logs.append)
    run = tmp_path / "run"
    assert any(line == f"report: {run / 'report.html'}" for line in logs), logs[-3:]

    page = parse(run / "report.html")
    pareto = pd.read_csv(run / "pareto.csv")
    assert result.feasible and len(pareto) >= 1
    assert page.trials_in("pareto") == pareto["number"].tolist()
    assert page.ids["pareto"] and "verdict" in page.ids
    assert f"trial {int(pareto['number'][0])}" in page.text["verdict"]
    for fid in PLOT_IDS:
        png = embedded_png(page, fid)
        width, height = png_size(png)
        assert width >= 600 and height >= 250, (fid, width, height)
        assert (run / "plots" / PLOT_FILES[fid]).read_bytes() == png
    assert_self_contained(page, run)
    trials = pd.read_csv(run / "trials.csv")
    baselines = [b for b in trials["baseline"].fillna("") if b]
    assert page.trials_in("baseline-trials") == trials.loc[trials["baseline"].notna(), "number"].tolist()
    assert "uncompressed" in baselines and any(b.startswith("uniform quantization.format=") for b in baselines)
    # every layer the search could set is in the chosen policy's table, knob by knob
    layers = [c for c in trials.columns if ":quantization.format" in c]
    assert len(layers) == 9 and page.text["policy-settings"].count("quantization.format") == len(layers)
    assert "In progress" not in page.text.get("in-progress", "")

    # the CLI regenerates it from the directory alone, even copied elsewhere without the storage and the model
    copy = tmp_path / "copied"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("study.db", "best_model.pt", "report.html", "plots"))
    capsys.readouterr()
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {copy / 'report.html'}"
    again = parse(copy / "report.html")
    assert again.trials_in("pareto") == pareto["number"].tolist()
    assert all(fid in again.images for fid in PLOT_IDS)

    # a run still going: no trials.csv yet, so the trials so far come from the Optuna storage
    going = tmp_path / "going"
    shutil.copytree(run, going, ignore=shutil.ignore_patterns("trials.csv", "pareto.csv", "best_policy.yaml",
                                                              "report.html", "plots"))
    progress = parse(write_report(going))
    assert "In progress" in progress.text["in-progress"]
    assert f"{len(trials)} of 9 trials so far" in progress.text["in-progress"]
    assert progress.trials_in("pareto") == pareto["number"].tolist()  # the same front, before test accuracy
    assert load_run(going).source == "study.db"


# --- crafted run directories ------------------------------------------------------------------------------------------


def record(number: int, **values) -> dict:
    row = {"number": number, "state": "COMPLETE", "feasible": False, "val_accuracy": float("nan"),
           "latency_ms": float("nan"), "memory_mb": float("nan"), "speedup": float("nan"), "simulated": "",
           "baseline": "", "policy": "", "skipped": "", "duration_s": 1.0, "error": ""}
    row.update(values)
    return row


def write_run(run_dir: Path, rows: list[dict], budget: str, pareto: list[int] | None = None,
              best_policy: dict | None = None) -> Path:
    run_dir.mkdir(parents=True)
    base = {"latency_ms": 10.0, "memory_mb": 2.0, "val_accuracy": 0.85, "test_accuracy": 0.84}
    config = {"model": {"name": "vit_tiny_patch16_224"}, "target": {"threads": 2, "batch_size": 64},
              "budget": budget, "search": {"trials": len(rows), "sampler": "tpe", "seed": 0}}
    (run_dir / "baseline.yaml").write_text(yaml.safe_dump(base))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    frame = trials_frame(rows, base["latency_ms"])  # the columns exactly as a search writes them
    frame.to_csv(run_dir / "trials.csv", index=False)
    front = frame[frame["number"].isin(pareto or [])].copy()
    front["test_accuracy"] = front["val_accuracy"] - 0.01
    front.set_index("number", drop=False).loc[pareto or []].to_csv(run_dir / "pareto.csv", index=False)
    if best_policy is not None:
        (run_dir / "best_policy.yaml").write_text(yaml.safe_dump(best_policy))
    return run_dir


def test_a_run_with_no_feasible_policy_says_so_at_the_top(tmp_path):
    fmt = "blocks.0.attn.qkv:quantization.format"
    rows = [
        record(0, baseline="uncompressed", latency_ms=10.2, memory_mb=2.0, speedup=0.98, skipped="latency over budget",
               policy="uncompressed", **{fmt: "fp32"}),
        record(1, baseline="uniform quantization.format=bf16", latency_ms=7.9, memory_mb=1.0, speedup=1.27,
               skipped="latency over budget", **{fmt: "bf16"}),
        record(2, latency_ms=6.4, memory_mb=1.2, speedup=1.56, skipped="latency over budget", **{fmt: "int8_dynamic"}),
        record(3, state="FAIL", error="TechniqueError: rank 99 exceeds the layer", **{fmt: "bf16"}),
        record(4, state="PRUNED", skipped="stopped early: poor accuracy at step 50", **{fmt: "bf16"}),
    ]
    run = write_run(tmp_path / "none", rows, budget="latency=0.5x")
    page = parse(write_report(run))
    verdict = page.text["verdict"].strip()
    assert verdict.startswith("No policy met the budget latency=0.5x (latency_ms ≤ 5) in 5 trials.")
    assert "6.4 ms (trial 2), 1.28× the limit" in verdict
    assert page.order.index("verdict") < page.order.index("h2"), "the statement comes before any section"
    assert "pareto-empty" in page.ids and page.trials_in("pareto") == []
    assert "none met the budget" in page.text["no-policy"]
    assert page.text["outcome-counts"].strip() == "3 over budget, 1 stopped early, 1 failed."
    reasons = page.text["not-within-budget"]
    assert "rank 99 exceeds the layer" in reasons and "poor accuracy at step 50" in reasons
    assert {"plot-accuracy-latency", "plot-accuracy-memory", "plot-best-so-far"} <= set(page.images)
    assert "plot-policy" not in page.images
    assert not (run / "plots" / PLOT_FILES["plot-policy"]).exists()
    assert_self_contained(page, run)
    assert "timing-drift" not in page.ids, "10.2 ms against a 10 ms baseline is within the noise"


def test_a_run_whose_timings_drifted_says_so_at_the_top(tmp_path):
    """The uncompressed model timed again as trial 0 at 2.6x the baseline: the machine's load changed, so every
    speedup on the page is suspect, and the page (and the search's log) say so before anything else."""
    fmt = "blocks.0.attn.qkv:quantization.format"
    rows = [
        record(0, baseline="uncompressed", latency_ms=26.0, memory_mb=2.0, skipped="latency over budget",
               policy="uncompressed", **{fmt: "fp32"}),
        record(1, latency_ms=4.0, memory_mb=1.0, feasible=True, val_accuracy=0.84, **{fmt: "bf16"}),
    ]
    run = write_run(tmp_path / "drift", rows, budget="latency=0.5x", pareto=[1])
    page = parse(write_report(run))
    warning = page.text["timing-drift"]
    assert "26.00 ms as trial 0 but 10.00 ms at the start (2.60x)" in warning, warning
    assert page.order.index("timing-drift") < page.order.index("h2")
    assert timing_drift(trials_frame(rows, 10.0), 10.0) is not None
    assert timing_drift(trials_frame(rows, 10.0), 24.0) is None, "within 25% of the baseline"
    assert timing_drift(trials_frame(rows[1:], 10.0), 10.0) is None, "no uncompressed trial: nothing to compare"


def many_techniques_run(tmp_path: Path) -> Path:
    """Two blocks searched by quantization, low-rank, pruning, a third-party 'tome' knob and distillation."""
    def params(fmt, rank, heads, mlp, r, steps, head_fmt="fp32"):
        out = {}
        for b in (0, 1):
            for sub in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out[f"blocks.{b}.{sub}:quantization.format"] = fmt[b]
                out[f"blocks.{b}.{sub}:lowrank.rank"] = rank[b]
            out[f"blocks.{b}:pruning.heads"] = heads[b]
            out[f"blocks.{b}:pruning.mlp"] = mlp[b]
            out[f"blocks.{b}:tome.r"] = r[b]
        out["head:quantization.format"] = head_fmt
        out["distillation.steps"] = steps
        return out

    rows = [
        record(0, baseline="uncompressed", policy="uncompressed", val_accuracy=0.85, latency_ms=10.0, memory_mb=2.0,
               speedup=1.0, skipped="latency over budget",
               **params(("fp32", "fp32"), (1.0, 1.0), (3, 3), (1.0, 1.0), (0, 0), 0)),
        record(1, feasible=True, val_accuracy=0.83, latency_ms=4.1, memory_mb=0.6, speedup=2.44,
               simulated="blocks.1.mlp.fc2:quantization", policy="quantization: 5 layers; pruning: 1 layers",
               **params(("bf16", "int8_dynamic"), (1.0, 0.5), (2, 3), (1.0, 0.5), (0, 4), 200, head_fmt="bf16")),
        record(2, feasible=True, val_accuracy=0.80, latency_ms=3.0, memory_mb=0.5, speedup=3.33,
               **params(("int8_dynamic", "int8_dynamic"), (0.5, 0.5), (2, 2), (0.5, 0.5), (4, 4), 100)),
        record(3, feasible=True, val_accuracy=0.79, latency_ms=3.5, memory_mb=0.5, speedup=2.86,
               **params(("bf16", "bf16"), (0.25, 1.0), (1, 3), (1.0, 1.0), (0, 0), 0)),
    ]
    rows[1]["blocks.1.mlp.fc2:quantization.format"] = "int4_weight"
    run = write_run(tmp_path / "many", rows, budget="latency=0.5x", pareto=[1, 2])
    return run


def test_the_policy_picture_shows_every_technique_knob_including_a_third_party_one(tmp_path):
    run = many_techniques_run(tmp_path)
    picture = layer_picture(load_run(run))
    assert picture is not None and picture.trial == 1
    assert [p.key for p in picture.panels] == ["lowrank.rank", "pruning.heads", "pruning.mlp", "quantization.format",
                                               "tome.r"]
    assert picture.rows == ["blocks.0", "blocks.1", "head"]
    quant = next(p for p in picture.panels if p.key == "quantization.format")
    assert quant.columns == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert quant.cells[("head", None)].value == "bf16" and quant.cells[("head", None)].changed
    assert quant.cells[("blocks.1", "mlp.fc2")].simulated
    heads = next(p for p in picture.panels if p.key == "pruning.heads")
    assert heads.cells[("blocks.0", "")].value == 2 and heads.cells[("blocks.0", "")].changed
    assert not heads.cells[("blocks.1", "")].changed  # 3 heads: as in the uncompressed trial
    assert picture.options["distillation.steps"].value == 200

    page = parse(write_report(run))
    settings = page.text["policy-settings"]
    for knob, count in {"quantization.format": 9, "lowrank.rank": 8, "pruning.heads": 2, "tome.r": 2}.items():
        assert settings.count(knob) == count, knob
    assert "int4_weight (simulated)" in settings
    assert page.trials_in("pareto") == [1, 2]
    chosen = page.text["pareto"]
    assert "int4_weight ×1" in chosen and "83.00%" in chosen and "82.00%" in chosen  # val and test accuracy
    assert "distillation.steps = 200" in page.text["policy-options"]
    png = embedded_png(page, "plot-policy")
    assert png_size(png)[0] > png_size(embedded_png(page, "plot-best-so-far"))[0]  # five panels side by side


def test_a_failing_report_does_not_lose_the_search_results(tmp_path, monkeypatch):
    """finish_run writes trials.csv and pareto.csv first; a broken report is a warning, not an error."""
    from autocompress.search import finish_run

    images = torch.randn(20, 1, 2, 2)
    data = SimpleNamespace(test=Split(images, torch.zeros(20, dtype=torch.long)))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    run = SimpleNamespace(budget=Budget.parse("latency=0.5x"), baseline=Baseline(10.0, 2.0, 0.5), model=model,
                          data=data, limit=5.0, config=None, rebuildable=False)
    rows = [record(0, latency_ms=9.0, memory_mb=2.0, skipped="latency over budget", baseline="uncompressed")]

    def broken(run_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("autocompress.report.write_report", broken)
    logs: list[str] = []
    result = finish_run(run, rows, tmp_path, log=logs.append)
    assert not result.feasible
    assert (tmp_path / "trials.csv").is_file() and (tmp_path / "pareto.csv").is_file()
    assert not (tmp_path / "report.html").exists()
    assert any(line.startswith("warning: the report could not be written (RuntimeError: disk on fire)")
               for line in logs)
    monkeypatch.undo()
    finish_run(run, rows, tmp_path, log=logs.append)
    assert "No policy met the budget" in parse(tmp_path / "report.html").text["verdict"]


def test_report_cli_help_and_bad_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0 and "RUN_DIR" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no autocompress run here" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    page = write_report(many_techniques_run(tmp_path))
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,3000",
         f"--screenshot={shot}", page.resolve().as_uri()],
        check=True, timeout=120, capture_output=True,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1280)
    # the embedded pictures were drawn: many distinct colours, and not an almost-blank page
    colours = {tuple(p) for p in (pixels[::7, ::7] * 255).astype(int).reshape(-1, 3).tolist()}
    assert len(colours) > 200
    assert (pixels.mean(axis=2) < 0.8).mean() > 0.03


def test_a_run_in_progress_shows_what_exists_and_says_so(tmp_path):
    fmt = "blocks.0.attn.qkv:quantization.format"
    rows = [
        record(0, baseline="uncompressed", latency_ms=10.0, memory_mb=2.0, skipped="latency over budget",
               **{fmt: "fp32"}),
        record(1, feasible=True, val_accuracy=0.84, latency_ms=4.0, memory_mb=1.0, **{fmt: "bf16"}),
        record(2, feasible=True, val_accuracy=0.82, latency_ms=4.5, memory_mb=0.6, **{fmt: "int8_dynamic"}),
        record(3, feasible=True, val_accuracy=0.83, latency_ms=3.0, memory_mb=0.6, **{fmt: "int8_dynamic"}),
    ]
    run = write_run(tmp_path / "started", rows, budget="latency=0.5x", pareto=[1, 3])
    for name in ("trials.csv", "pareto.csv"):
        (run / name).unlink()
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("trials: 4", "trials: 40"))
    # just started: only the config and the baseline exist
    page = parse(write_report(run))
    assert "0 of 40 trials so far, no finished trial yet" in page.text["in-progress"]
    assert "verdict" not in page.ids and not page.images
    assert {"plot-accuracy-latency-missing", "plot-best-so-far-missing"} <= set(page.ids)

    # interrupted (Ctrl-C writes trials.csv, never pareto.csv): the front is computed from the trials so far
    trials_frame(rows, 10.0).to_csv(run / "trials.csv", index=False)
    page = parse(write_report(run))
    assert "4 of 40 trials so far" in page.text["in-progress"]
    assert page.trials_in("pareto") == [1, 3]  # trial 2 is beaten by trial 3 on both accuracy and latency
    assert "Best within budget: trial 1" in page.text["verdict"]
    assert "plot-policy" in page.images


def test_long_composed_baseline_labels_do_not_collapse_the_plots(tmp_path):
    """The demo's report warned 'constrained_layout not applied because axes sizes collapsed to zero': the label of
    a composed baseline, written next to its point, was laid out as if it were part of the figure."""
    import warnings

    fmt = "blocks.0.attn.qkv:quantization.format"
    long_label = "composed: bf16 everywhere + pruning.mlp=0.25 + lowrank.rank=0.25 + all the others"
    rows = [
        record(0, baseline="uncompressed", latency_ms=10.0, memory_mb=2.0, skipped="latency over budget",
               **{fmt: "fp32"}),
        record(1, baseline="uniform quantization.format=bf16", latency_ms=6.0, memory_mb=1.0,
               skipped="latency over budget", **{fmt: "bf16"}),
        record(2, baseline=long_label, latency_ms=4.9, memory_mb=0.5, feasible=True, val_accuracy=0.84,
               **{fmt: "bf16"}),
        # two more at the same spot on the right edge: their labels are joined into one long line there
        record(3, baseline=long_label + " (a)", latency_ms=10.4, memory_mb=2.1, val_accuracy=0.86, **{fmt: "bf16"}),
        record(4, baseline=long_label + " (b)", latency_ms=10.41, memory_mb=2.1, val_accuracy=0.86, **{fmt: "bf16"}),
    ]
    run = write_run(tmp_path / "composed", rows, budget="latency=0.5x", pareto=[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = parse(write_report(run))
    assert {"plot-accuracy-latency", "plot-accuracy-memory"} <= set(page.images)


def test_text_from_the_run_is_shown_as_text_never_as_markup(tmp_path):
    """Error messages, policy summaries and baseline labels come from plugins and configs: the page shows them as
    written, and a '<script>' in one of them is never a tag."""
    fmt = "blocks.0.attn.qkv:quantization.format"
    rows = [
        record(0, baseline="uncompressed", latency_ms=10.0, memory_mb=2.0, skipped="latency over budget",
               policy="uncompressed", **{fmt: "fp32"}),
        record(1, feasible=True, val_accuracy=0.84, latency_ms=4.0, memory_mb=1.0, baseline='uniform "<b>" & co',
               policy="<i>quantization</i>: 1 layers", **{fmt: "bf16"}),
        record(2, state="FAIL", error="TechniqueError: <script>alert('x')</script> & more", **{fmt: "bf16"}),
    ]
    run = write_run(tmp_path / "markup", rows, budget="latency=0.5x", pareto=[1])
    html = write_report(run).read_text()
    page = parse(run / "report.html")
    assert "<script>" not in html and "<i>" not in html and "<b>" not in html
    assert "<script>alert('x')</script> & more" in page.text["not-within-budget"]
    assert "<i>quantization</i>: 1 layers" in page.text["pareto"] and 'uniform "<b>" & co' in page.text["pareto"]
    assert page.trials_in("baseline-trials") == [0, 1]
