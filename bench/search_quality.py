"""Search quality on Fashion-MNIST (the demo ViT): does the joint search beat the simple answers?

For each latency budget (default 0.5x and 0.25x): the joint search (TPE, all installed techniques, N trials), its
best policy's test-accuracy drop; every uniform single-technique baseline (enqueued in the same run, measured in the
same process) that meets the budget; and random search with 5x the trials. Targets from the issue: drop <= 0.3
points at 0.5x and <= 1.0 at 0.25x; joint search within 40 trials at least as good as 200 random trials.

Random sampling does not look at the budget, so one random run serves every budget: it runs under the loosest one
(every trial within it is evaluated for accuracy, so every trial within a tighter one is too), and its best policy
for a tighter budget is the best-validation Pareto point whose measured latency is within that budget.

    python bench/search_quality.py [--trials 40] [--random-factor 5] [--budgets 0.5,0.25] [--reuse-random]
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


def run_search(budget: float, sampler: str, trials: int, tag: str, baselines: bool) -> autocompress.SearchResult:
    config = load_config(ROOT / "examples" / "fashion_mnist.yaml")
    config.search.baselines = baselines
    out = RUNS / f"quality-{tag}-{budget:g}x"
    shutil.rmtree(out, ignore_errors=True)
    return autocompress.search(config, budget=f"latency={budget:g}x", sampler=sampler, trials=trials, out=out,
                               progress=True, log=lambda s: None)


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
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--reuse-random", action="store_true",
                        help="read the random search from its run directory when it finished before (it does not "
                             "depend on the joint search's code, and it is the longest part)")
    args = parser.parse_args()
    report = {}
    budgets = [float(b) for b in args.budgets.split(",")]
    started = time.perf_counter()
    saved = RUNS / f"quality-random-{max(budgets):g}x"
    if args.reuse_random and (saved / "pareto.csv").is_file():
        rand = SavedRun(saved)
        if len(rand.trials) != args.trials * args.random_factor:
            sys.exit(f"{saved} holds {len(rand.trials)} random trials, not {args.trials * args.random_factor}")
        print(f"random search: reusing the finished run in {saved}")
    else:
        rand = run_search(max(budgets), "random", args.trials * args.random_factor, "random", baselines=False)
    seconds = {"random": time.perf_counter() - started}
    for budget in budgets:
        started = time.perf_counter()
        joint = run_search(budget, "tpe", args.trials, "joint", baselines=True)
        seconds[f"joint {budget:g}x"] = time.perf_counter() - started
        base = joint.baseline
        rows = []

        def add(label: str, row: dict, trials: int | str, base_ms: float = base["latency_ms"]) -> None:
            if not row:
                rows.append((label, trials, "-", "-", "-", "-", "none within budget"))
                return
            test = row.get("test_accuracy", math.nan)
            rows.append((label, trials, row["val_accuracy"], test, 100 * (base["test_accuracy"] - test),
                         base_ms / row["latency_ms"], row.get("policy", "")))

        add(f"joint search (TPE, {args.trials} trials)", best_row(joint), args.trials)
        add(f"random search ({args.trials * args.random_factor} trials)", best_row(rand, budget),
            args.trials * args.random_factor, rand.baseline["latency_ms"])
        trials = joint.trials
        uniform = trials[trials["baseline"].fillna("").astype(str).str.len() > 0]
        for _, u in uniform.iterrows():
            feasible = bool(u["feasible"])
            rows.append((f"baseline: {u['baseline']}", 1, u["val_accuracy"] if feasible else "-",
                         "(val only)", "-", base["latency_ms"] / u["latency_ms"],
                         "within budget" if feasible else "over budget"))
        print(f"\n### latency budget {budget:g}x (uncompressed: {base['latency_ms']:.2f} ms, "
              f"val {base['val_accuracy']:.4f}, test {base['test_accuracy']:.4f})\n")
        print(markdown_table(["method", "trials", "val acc", "test acc", "test drop (points)", "speedup", "policy"],
                             rows))
        report[f"{budget:g}x"] = {
            "baseline": base,
            "joint": best_row(joint), "random": best_row(rand, budget), "random_baseline": rand.baseline,
            "uniform": uniform[["baseline", "feasible", "val_accuracy", "latency_ms"]].to_dict("records"),
        }
    print("\nwall-clock seconds per search: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    path = write_json("search_quality", {"trials": args.trials, "random_factor": args.random_factor,
                                         "seconds": seconds, "results": report})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
