"""Search quality on Fashion-MNIST (the demo ViT): does the joint search beat the simple answers?

For each latency budget (default 0.5x and 0.3x), side by side, each a whole search on this machine:

* ``solve``: the default search (profile, sensitivity, solver seeds, TPE refinement, finalize), N trials;
* ``sample``: the search before the solver (uniform and composed baselines, then TPE), N trials;
* ``front``: the solver's seeds alone (the uncompressed model + one trial per fraction, then finalize);
* ``quant``: the solver on a quantization-only space (the AutoQuantize recipe: per-layer formats, sensitivity,
  knapsack), N trials;
* ``random``: random search with 5x the trials (``--random-factor 0`` skips it).

Targets from the issue: at least 70% of evaluated trials within the budget; test drop <= 0.3 points (AVX-512) /
1.0 (AVX2) at 0.5x; a policy found and <= 2.0 points lost at 0.3x; the joint search beats each of the others. The
CPU kind is recorded with every result (``bench/results/<cpu kind>/``).

Random sampling does not look at the budget, so one random run serves every budget: it runs under the loosest one,
and its best policy for a tighter budget is the best-validation Pareto point within that budget.

    python bench/search_quality.py [--trials 40] [--budgets 0.5,0.3] [--methods solve,sample,front,quant,random]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

import autocompress  # noqa: E402
from autocompress.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "runs"


QUANT_ONLY_SPACE = {"techniques": {
    "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))",
                                 "format": ["fp32", "bf16", "int8_dynamic"]}, {"match": "head", "format": ["fp32", "bf16"]}],
                     "options": {"compute": ["fp32", "bf16"]}},
}}


def run_search(budget: float, method: str, trials: int) -> autocompress.SearchResult:
    import yaml

    config = load_config(ROOT / "examples" / "fashion_mnist.yaml")
    out = RUNS / f"quality-{method}-{budget:g}x"
    shutil.rmtree(out, ignore_errors=True)
    sampler = "tpe"
    if method == "sample":
        config.search.strategy = "sample"
    elif method == "random":
        config.search.strategy, config.search.baselines, sampler = "sample", False, "random"
    elif method == "front":
        trials = 1 + len(config.search.solver_fractions)
    elif method == "quant":
        out.mkdir(parents=True)
        (out.parent / "quant_only_space.yaml").write_text(yaml.safe_dump(QUANT_ONLY_SPACE))
        config.space = str(out.parent / "quant_only_space.yaml")
        out.rmdir()
    return autocompress.search(config, budget=f"latency={budget:g}x", sampler=sampler, trials=trials, out=out,
                               progress=True, log=lambda s: None)


def within_budget_share(result: autocompress.SearchResult) -> float:
    """Of the trials that were compressed and measured (not skipped on a prediction), the share within budget."""
    t = result.trials
    measured = t[t["latency_ms"].notna()]
    return float(measured["feasible"].mean()) if len(measured) else math.nan


class SavedRun:
    """The parts of a finished run's result that this benchmark reads, from its run directory."""

    def __init__(self, out: Path) -> None:
        import pandas as pd
        import yaml

        self.trials = pd.read_csv(out / "trials.csv")
        self.pareto = pd.read_csv(out / "pareto.csv")
        self.baseline = yaml.safe_load((out / "baseline.yaml").read_text())

    @property
    def best(self) -> dict | None:
        return None if self.pareto.empty else self.pareto.iloc[0].to_dict()


def best_row(result: autocompress.SearchResult, budget: float | None = None) -> dict:
    """The best feasible policy; with ``budget``, the best one whose latency is within ``budget`` x the run's
    uncompressed latency (a Pareto point of the run, so its test accuracy is in ``pareto``)."""
    if budget is None:
        return result.best or {}
    front = result.pareto
    within = front[front["latency_ms"] <= budget * result.baseline["latency_ms"]]
    return {} if within.empty else within.iloc[0].to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--random-factor", type=int, default=5)
    parser.add_argument("--budgets", default="0.5,0.3")
    parser.add_argument("--methods", default="solve,sample,front,quant,random")
    parser.add_argument("--reuse-random", action="store_true",
                        help="read the random search from its run directory when it finished before (it does not "
                             "depend on the joint search's code, and it is the longest part)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m and not (m == "random" and args.random_factor <= 0)]
    report = {}
    budgets = [float(b) for b in args.budgets.split(",")]
    seconds: dict[str, float] = {}
    rand = None
    if "random" in methods:
        started = time.perf_counter()
        saved = RUNS / f"quality-random-{max(budgets):g}x"
        if args.reuse_random and (saved / "pareto.csv").is_file():
            rand = SavedRun(saved)
            print(f"random search: reusing the finished run in {saved}")
        else:
            rand = run_search(max(budgets), "random", args.trials * args.random_factor)
        seconds["random"] = time.perf_counter() - started
    labels = {"solve": f"joint search: solver + TPE ({args.trials} trials)",
              "sample": f"joint search without the solver: baselines + TPE ({args.trials} trials)",
              "front": "the solver's seeds alone", "quant": f"quantization-only solver + TPE ({args.trials} trials)"}
    for budget in budgets:
        rows, results = [], {}
        base = None
        for method in [m for m in methods if m != "random"]:
            started = time.perf_counter()
            result = run_search(budget, method, args.trials)
            seconds[f"{method} {budget:g}x"] = time.perf_counter() - started
            base = base or result.baseline
            results[method] = result
            row = best_row(result)
            share = within_budget_share(result)
            rows.append(_row(labels[method], row, len(result.trials), share, result.baseline,
                             seconds[f"{method} {budget:g}x"]))
        if rand is not None:
            row = best_row(rand, budget)
            rows.append(_row(f"random search ({args.trials * args.random_factor} trials)", row, len(rand.trials),
                             math.nan, rand.baseline, seconds.get("random", math.nan)))
        base = base or (rand.baseline if rand is not None else {})
        print(f"\n### latency budget {budget:g}x (uncompressed: {base.get('latency_ms', math.nan):.2f} ms, "
              f"val {base.get('val_accuracy', math.nan):.4f}, test {base.get('test_accuracy', math.nan):.4f})\n")
        print(markdown_table(["method", "trials", "within budget", "val acc", "val acc finalized", "test acc",
                              "test drop (points)", "speedup", "wall s", "policy"], rows))
        report[f"{budget:g}x"] = {
            "baseline": base,
            **{m: {"best": best_row(r), "within_budget_share": within_budget_share(r), "trials": len(r.trials),
                   "seconds": seconds[f"{m} {budget:g}x"]} for m, r in results.items()},
            **({"random": best_row(rand, budget), "random_baseline": rand.baseline} if rand is not None else {}),
        }
    print("\nwall-clock seconds per search: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    path = write_json("search_quality", {"trials": args.trials, "random_factor": args.random_factor,
                                         "methods": methods, "seconds": seconds, "results": report})
    print(f"\nwrote {path}")


def _row(label: str, row: dict, trials: int, share: float, base: dict, seconds: float) -> tuple:
    if not row:
        return (label, trials, _pct(share), "-", "-", "-", "-", "-", f"{seconds:.0f}", "none within budget")
    test = row.get("test_accuracy", math.nan)
    final = row.get("val_accuracy_finalized", math.nan)
    return (label, trials, _pct(share), row["val_accuracy"], final, test,
            100 * (base["test_accuracy"] - test) if isinstance(test, float) else "-",
            base["latency_ms"] / row["latency_ms"], f"{seconds:.0f}", row.get("policy", ""))


def _pct(value: float) -> str:
    return "-" if not isinstance(value, float) or math.isnan(value) else f"{100 * value:.0f}%"


if __name__ == "__main__":
    main()
