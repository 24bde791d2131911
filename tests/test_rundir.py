"""The run directory: what a search saves is what the report reads back (autocompress/rundir.py)."""

from pathlib import Path

import yaml

from autocompress.report import load_run
from autocompress.report.layers import layer_picture
from autocompress.results import trials_frame
from autocompress.rundir import RunDir
from autocompress.space import Dimension, ResolvedSpace

FORMATS = ("fp32", "bf16", "int8_dynamic")


def space() -> ResolvedSpace:
    dims = [Dimension(f"blocks.{b}.attn.qkv:quantization.format", "quantization", "format", f"blocks.{b}.attn.qkv",
                      FORMATS, "fp32") for b in (0, 1)]
    dims.append(Dimension("blocks.0:pruning.heads", "pruning", "heads", "blocks.0", (3, 2, 1), 3))
    dims.append(Dimension("distillation.steps", "distillation", "steps", None, (0, 100), 0))
    return ResolvedSpace(dims)


def row(number: int, qkv0: str, qkv1: str, heads: int, steps: int, **values) -> dict:
    out = {"number": number, "state": "COMPLETE", "feasible": True, "val_accuracy": 0.8, "latency_ms": 4.0,
           "memory_mb": 1.0, "baseline": "", "policy": "", "simulated": "", "skipped": "", "error": "",
           "blocks.0.attn.qkv:quantization.format": qkv0, "blocks.1.attn.qkv:quantization.format": qkv1,
           "blocks.0:pruning.heads": heads, "distillation.steps": steps}
    out.update(values)
    return out


def test_the_report_takes_each_knobs_identity_from_the_saved_space_not_from_a_trial(tmp_path: Path):
    """No uncompressed trial among the rows (a solver-seeded run, say): the saved resolved space still says which
    cells of the chosen policy differ from the uncompressed model."""
    run = RunDir(tmp_path / "run")
    base = {"latency_ms": 10.0, "memory_mb": 2.0, "val_accuracy": 0.85, "test_accuracy": 0.84}
    run.write_start({"budget": "latency=0.5x", "search": {"trials": 2}}, base, space())
    frame = trials_frame([row(0, "bf16", "fp32", 3, 100, val_accuracy=0.83), row(1, "int8_dynamic", "bf16", 2, 0)],
                         base["latency_ms"])
    run.write_results(frame, frame.iloc[[0]], base, best_policy=None)

    assert run.read_identities([]) == {d.name: d.identity for d in space().dimensions}
    loaded = load_run(run.path)
    assert loaded.finished and loaded.source == "trials.csv" and loaded.uncompressed_row() is None
    picture = layer_picture(loaded)
    quant = next(p for p in picture.panels if p.key == "quantization.format")
    assert quant.cells[("blocks.0", "attn.qkv")].changed  # bf16, identity fp32
    assert not quant.cells[("blocks.1", "attn.qkv")].changed  # fp32: as uncompressed
    heads = next(p for p in picture.panels if p.key == "pruning.heads")
    assert not heads.cells[("blocks.0", "")].changed  # 3 heads: the identity
    assert picture.options["distillation.steps"].changed


def test_a_run_written_before_the_space_was_saved_still_reports_from_its_uncompressed_trial(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    base = {"latency_ms": 10.0, "memory_mb": 2.0, "val_accuracy": 0.85, "test_accuracy": 0.84}
    run.write_start({"budget": "latency=0.5x"}, base, space())
    (run / "resolved_space.yaml").unlink()
    frame = trials_frame([row(0, "fp32", "fp32", 3, 0, baseline="uncompressed", feasible=False),
                          row(1, "bf16", "fp32", 3, 0)], base["latency_ms"])
    run.write_results(frame, frame.iloc[[1]], base, best_policy=None)
    loaded = load_run(run.path)
    assert loaded.identities is None
    quant = next(p for p in layer_picture(loaded).panels if p.key == "quantization.format")
    assert quant.cells[("blocks.0", "attn.qkv")].changed and not quant.cells[("blocks.1", "attn.qkv")].changed


def test_the_saved_space_is_plain_yaml(tmp_path: Path):
    run = RunDir(tmp_path)
    run.write_space(space())
    data = yaml.safe_load((tmp_path / "resolved_space.yaml").read_text())
    assert data["dimensions"][2] == {"name": "blocks.0:pruning.heads", "technique": "pruning", "knob": "heads",
                                     "layer": "blocks.0", "choices": [3, 2, 1], "identity": 3}
