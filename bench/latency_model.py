"""Latency model: prediction error on random policies, and what a prediction saves per rejected trial.

    OMP_WAIT_POLICY=PASSIVE python bench/latency_model.py [--policies 50] [--models demo deit]

For the demo ViT (examples/fashion_mnist.yaml, batch 256) and the DeiT-S architecture (random weights, 224x224,
batch 8), with the builtin search space (search_spaces/vit.yaml) and every installed technique:

1. profile a fresh table (time, what was timed) and open it again (nothing may be timed);
2. for N random policies of the space, run exactly what the search runs for a candidate that is over a latency
   budget -- compress it (or, with recovery training, its structure) and measure it end to end
   (``runner.evaluate_params`` with a limit nothing meets) -- and compare that measured latency with the prediction;
3. report the median absolute percentage error (target <= 10%) of the predicted speed ratio against the ratio
   measured with the uncompressed model interleaved round by round (so the load of a shared machine, which drifts
   by 2x within minutes here, cancels); and, as a search uses it, of the prediction calibrated once to the
   uncompressed latency measured at the start against the latency the trial path measured;
4. the time a rejection by prediction takes against the time the measured rejection took, and how many of the
   policies a 0.5x budget with the 1.3 margin would skip (and whether any of them was in fact within the budget).

Timings are taken on whatever else runs on the machine: say so when reporting them.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from autocompress.compose import apply_policy  # noqa: E402
from autocompress.config import RunConfig, TargetConfig  # noqa: E402
from autocompress.costs import compare_latency  # noqa: E402
from autocompress.costs import memory_mb  # noqa: E402
from autocompress.data import Dataset, Split  # noqa: E402
from autocompress.latency_model import build_predictor  # noqa: E402
from autocompress.models import create_model  # noqa: E402
from autocompress.pluginmanager import load_plugins  # noqa: E402
from autocompress.runner import Baseline, RunContext, evaluate_params  # noqa: E402
from autocompress.budget import Budget  # noqa: E402
from autocompress.space import SearchSpace  # noqa: E402
from autocompress.technique import ApplyContext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def model_specs() -> dict[str, dict[str, Any]]:
    demo = yaml.safe_load((ROOT / "examples" / "fashion_mnist.yaml").read_text())
    return {
        "demo": {"label": "demo ViT (Fashion-MNIST config)", "name": demo["model"]["name"],
                 "kwargs": demo["model"]["kwargs"], "batch": demo["target"]["batch_size"], "classes": 10,
                 "shape": (demo["model"]["kwargs"].get("in_chans", 3), 28, 28)},
        "deit": {"label": "DeiT-S (random weights)", "name": "deit_small_patch16_224", "kwargs": {}, "batch": 8,
                 "classes": 1000, "shape": (3, 224, 224)},
    }


def fake_data(shape: tuple[int, ...], classes: int, n: int = 512) -> Dataset:
    """Random images: timings do not depend on pixel values; techniques that calibrate get something to run on."""
    g = torch.Generator().manual_seed(0)

    def split(k: int) -> Split:
        return Split(torch.randn(k, *shape, generator=g), torch.randint(0, classes, (k,), generator=g))

    return Dataset(split(n), split(256), split(256), tuple(str(i) for i in range(classes)))


def bench_model(key: str, spec: dict[str, Any], n_policies: int, threads: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(spec["name"], spec["kwargs"]).eval()
    plugins = load_plugins()
    space = SearchSpace.load(ROOT / "search_spaces" / "vit.yaml").resolve(model, plugins.techniques)
    data = fake_data(spec["shape"], spec["classes"])
    example = data.val.images.repeat(-(-spec["batch"] // 256), 1, 1, 1)[: spec["batch"]].contiguous()
    target = TargetConfig(threads=threads, batch_size=spec["batch"], warmup=3, repeats=10)

    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(model_name=spec["name"], model_kwargs=spec["kwargs"], threads=threads, warmup=target.warmup,
                      repeats=target.repeats, path=Path(tmp) / "table.json")
        started = time.perf_counter()
        predictor, stats = build_predictor(model, example, space, plugins, progress=True, **kwargs)
        profile_s = time.perf_counter() - started
        started = time.perf_counter()
        _, again = build_predictor(model, example, space, plugins, progress=False, **kwargs)
        reopen_s = time.perf_counter() - started
        table_bytes = (Path(tmp) / "table.json").stat().st_size

    config = RunConfig(target=target)
    config.model.name, config.model.kwargs = spec["name"], spec["kwargs"]
    config.search.latency_model = False
    config.data.train_subset, config.data.calibration_size = 256, 128
    budget = Budget.parse("latency_ms=0.000001")  # nothing meets it: every candidate takes the measured rejection path
    base_ms = measure(model, example, target)
    run = RunContext(config, plugins, model, data, space, budget, example, Baseline(base_ms, memory_mb(model), 0.0))
    once = predictor.calibrated(base_ms)

    rng = random.Random(seed)
    rows = []
    for i in range(n_policies):
        params = {d.name: rng.choice(d.choices) for d in space.dimensions}
        policy = run.policy(params)
        started = time.perf_counter()
        predicted_raw = predictor.predict(policy)
        predict_s = time.perf_counter() - started
        record = evaluate_params(run, params, i)
        if record["state"] != "COMPLETE" or not math.isfinite(record["latency_ms"]):
            rows.append({"policy": i, "error": record.get("error") or record["state"]})
            continue
        # the same structure and kernels, timed interleaved with the uncompressed model: per-round ratios
        compressed = apply_policy(model, policy, plugins.techniques, ApplyContext(structure_only=True))
        paired = compare_latency({"base": model, "policy": compressed}, example, threads, target.warmup,
                                 target.repeats)
        ratio = statistics.median(a / b for a, b in zip(paired["policy"].samples_ms, paired["base"].samples_ms))
        rows.append({
            "policy": i, "measured_ms": record["latency_ms"], "predicted_ms": once.predict(policy),
            "measured_ratio": ratio, "predicted_ratio": predicted_raw / float(predictor.table.base_ms),
            "rejection_measured_s": record["duration_s"], "rejection_predicted_s": predict_s,
            "summary": record["policy"],
        })
        r = rows[-1]
        print(f"  {key} {i + 1}/{n_policies}: measured {r['measured_ms']:.2f} ms, predicted {r['predicted_ms']:.2f}; "
              f"ratio to uncompressed measured {ratio:.3f}, predicted {r['predicted_ratio']:.3f}", flush=True)
    ok = [r for r in rows if "measured_ms" in r]

    def ape(field: str) -> list[float]:
        if field == "predicted_ratio":
            return [abs(r["predicted_ratio"] - r["measured_ratio"]) / r["measured_ratio"] for r in ok]
        return [abs(r[field] - r["measured_ms"]) / r["measured_ms"] for r in ok]

    # a 0.5x budget, the default 1.3 margin; judged on the load-free ratios
    rejected = [r for r in ok if r["predicted_ratio"] > 1.3 * 0.5]
    return {
        "model": spec["label"], "timm_name": spec["name"], "batch": spec["batch"], "threads": threads,
        "policies": len(ok), "failed_policies": len(rows) - len(ok),
        "profile_s": profile_s, "profile": vars(stats), "reopen_s": reopen_s, "reopen_timed": again.measured,
        "table_bytes": table_bytes, "base_ms": base_ms, "residual_share": once.residual_ms / once.base_ms,
        "mape_calibrated_once": statistics.median(ape("predicted_ms")),
        "mape_paired": statistics.median(ape("predicted_ratio")),
        "p90_ape_paired": sorted(ape("predicted_ratio"))[int(0.9 * (len(ok) - 1))],
        "max_ape_paired": max(ape("predicted_ratio")),
        "rejection_measured_s": statistics.median(r["rejection_measured_s"] for r in ok),
        "rejection_predicted_s": statistics.median(r["rejection_predicted_s"] for r in ok),
        "rejected_at_0.5x_margin_1.3": len(rejected),
        "false_rejections": sum(1 for r in rejected if r["measured_ratio"] <= 0.5),
        "load_average": os.getloadavg(),
        "rows": rows,
    }


def measure(model: torch.nn.Module, example: torch.Tensor, target: TargetConfig) -> float:
    from autocompress.costs import measure_latency

    return measure_latency(model, example, target.threads, target.warmup, target.repeats).median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--models", nargs="*", choices=["demo", "deit"], default=["demo", "deit"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = model_specs()
    load_before = os.getloadavg()
    results = {key: bench_model(key, specs[key], args.policies, args.threads, args.seed) for key in args.models}
    headers = ["model", "batch", "policies", "median APE (paired with uncompressed)", "p90 APE (paired)",
               "median APE (calibrated at start)", "residual share", "profile s", "timed / reused / from table",
               "reopen: timed",
               "rejection measured s", "rejection predicted ms", "rejected at 0.5x (1.3 margin)", "false rejections"]
    rows = [[r["model"], r["batch"], r["policies"], f"{100 * r['mape_paired']:.1f}%",
             f"{100 * r['p90_ape_paired']:.1f}%", f"{100 * r['mape_calibrated_once']:.1f}%",
             f"{100 * r['residual_share']:.0f}%", f"{r['profile_s']:.0f}",
             f"{r['profile']['measured']} / {r['profile']['reused']} / {r['profile']['from_table']}",
             r["reopen_timed"], f"{r['rejection_measured_s']:.2f}", f"{1000 * r['rejection_predicted_s']:.2f}",
             r["rejected_at_0.5x_margin_1.3"], r["false_rejections"]] for r in results.values()]
    print("\n# Latency model: prediction error and time saved per rejected trial\n")
    print(f"{args.policies} random policies of search_spaces/vit.yaml per model, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (a shared machine: other work ran meanwhile).\n")
    print(markdown_table(headers, rows))
    path = write_json("latency_model", {"policies": args.policies, "threads": args.threads,
                                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                        "load_average_before": load_before, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
