"""Framework overhead per trial: everything but model evaluation, latency measurement and technique work.

Runs a short search on the demo config with timers around the parts that are the model's own work (compressing,
including recovery training; measuring latency; computing validation accuracy). What is left of the search loop's
wall time — sampling, policy building, storage writes, bookkeeping — is the framework's overhead. Target: <= 5%.

    python bench/overhead.py [--trials 15]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

import autocompress  # noqa: E402
import autocompress.runner as runner  # noqa: E402
from autocompress.search.optuna_backend import OptunaBackend  # noqa: E402
from autocompress.config import load_config  # noqa: E402
from autocompress.metric import Metric  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()
    spent = {"compress": 0.0, "latency": 0.0, "accuracy": 0.0, "loop": 0.0}
    # only time inside the search loop counts (the Pareto rebuild after it compresses too), and only the outermost
    # timed part (recovery training evaluates accuracy inside compress: that is compress time, counted once)
    state = {"in_loop": False, "depth": 0}

    def timed(key, fn):
        def wrapper(*a, **kw):
            outer = key == "loop" or (state["in_loop"] and state["depth"] == 0)
            if key == "loop":
                state["in_loop"] = True
            elif outer:
                state["depth"] += 1
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if outer:
                    spent[key] += time.perf_counter() - start
                if key == "loop":
                    state["in_loop"] = False
                elif outer:
                    state["depth"] -= 1
        return wrapper

    runner.apply_policy = timed("compress", runner.apply_policy)
    runner.RunContext.measure = timed("latency", runner.RunContext.measure)
    Metric.__call__ = timed("accuracy", Metric.__call__)  # the validation score, whichever metric computes it
    OptunaBackend.run = timed("loop", OptunaBackend.run)  # the ask/tell loop

    config = load_config(ROOT / "examples" / "fashion_mnist.yaml")
    out = ROOT / "bench" / "runs" / "overhead"
    shutil.rmtree(out, ignore_errors=True)
    autocompress.search(config, trials=args.trials, out=out, progress=False, log=lambda s: None)
    model_work = spent["compress"] + spent["latency"] + spent["accuracy"]
    overhead = spent["loop"] - model_work
    rows = [(k, v, 100 * v / spent["loop"]) for k, v in
            [("compress (incl. recovery training)", spent["compress"]), ("latency measurement", spent["latency"]),
             ("validation accuracy", spent["accuracy"]), ("framework overhead", overhead)]]
    print(f"\n### where a trial's time goes ({args.trials} trials, demo ViT)\n")
    print(markdown_table(["part", "seconds", "% of search loop"], rows))
    # the overhead is about the same for every trial; its share depends on what the trial paid for
    trials = pd.read_csv(out / "trials.csv")
    per_trial = overhead / len(trials)
    evaluated = trials[trials["val_accuracy"].notna()]["duration_s"]
    skipped = trials[trials["val_accuracy"].isna()]["duration_s"]
    kinds = [("evaluated (compressed, trained where the policy says, measured, validated)", evaluated),
             ("rejected on cost before evaluation", skipped)]
    print(f"\nframework overhead per trial: {per_trial:.3f} s; as a share of a trial's own duration:\n")
    print(markdown_table(["trials", "count", "median trial s", "overhead share"],
                         [(k, len(d), d.median() if len(d) else "-",
                           f"{100 * per_trial / (d.median() + per_trial):.1f}%" if len(d) else "-") for k, d in kinds]))
    path = write_json("overhead", {"trials": args.trials, "seconds": spent, "overhead_s": overhead,
                                   "overhead_percent": 100 * overhead / spent["loop"],
                                   "overhead_per_trial_s": per_trial,
                                   "median_evaluated_trial_s": float(evaluated.median()) if len(evaluated) else None,
                                   "median_rejected_trial_s": float(skipped.median()) if len(skipped) else None})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
