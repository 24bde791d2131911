"""Real speedup at a tight budget on the DeiT-S architecture (224x224, batch 8).

No ImageNet weights exist here (nothing is downloaded), so the DeiT-S has random weights and the quality signal is
**agreement with the uncompressed model's top-1 predictions** on sample inputs (validation and test sets of random
images labelled by the uncompressed model). Recovery training is left out of the space (it would train a random
network). The chosen policy's speedup is measured on the realised model. Target: >= 4x at a 0.25x budget.

What this shows is the speed the search reaches under the budget, not quality: a random network's logits are nearly
flat, so any compression strong enough for 4x flips most top-1 predictions and agreement falls to near chance.

    python bench/deit_budget.py [--trials 40] [--budget 0.25]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import timm
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

import autocompress  # noqa: E402
from autocompress.config import RunConfig  # noqa: E402
from autocompress.data import Dataset, Split  # noqa: E402
from autocompress.evaluate import logits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "runs"


def agreement_data(model: torch.nn.Module, n_val: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_val + n_test + 64, 3, 224, 224, generator=g)
    labels = logits(model, images, batch_size=32).argmax(-1)
    train = Split(images[:64], labels[:64])
    val = Split(images[64 : 64 + n_val], labels[64 : 64 + n_val])
    test = Split(images[64 + n_val :], labels[64 + n_val :])
    return Dataset(train, val, test, tuple(str(i) for i in range(1000)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--val", type=int, default=96)
    parser.add_argument("--test", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    data = agreement_data(model, args.val, args.test)
    RUNS.mkdir(parents=True, exist_ok=True)
    space = yaml.safe_load((ROOT / "search_spaces" / "vit.yaml").read_text())
    space["techniques"].pop("distillation", None)
    space_path = RUNS / "deit_space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    out = RUNS / f"deit-{args.budget:g}x"
    shutil.rmtree(out, ignore_errors=True)
    config = RunConfig()
    config.model.name = "deit_small_patch16_224"
    config.target.batch_size, config.target.threads, config.target.repeats = 8, 2, 7
    config.data.calibration_size = 64
    config.space, config.out = str(space_path), str(out)
    started = time.perf_counter()
    lines: list[str] = []

    def log(line: str) -> None:  # the run's phases and decisions, timed, on stderr and in the JSON
        lines.append(f"[{time.perf_counter() - started:6.0f} s] {line}")
        print(lines[-1], file=sys.stderr, flush=True)

    result = autocompress.search(config, model=model, data=data, budget=f"latency={args.budget:g}x",
                                 trials=args.trials, progress=True, log=log)
    wall = time.perf_counter() - started
    base = result.baseline
    rows = []
    for _, row in result.pareto.head(8).iterrows():
        rows.append((int(row["number"]), row["val_accuracy"], row.get("test_accuracy"), row["latency_ms"],
                     base["latency_ms"] / row["latency_ms"], row["policy"]))
    print(f"\n### DeiT-S, latency budget {args.budget:g}x (uncompressed {base['latency_ms']:.1f} ms at batch 8)\n")
    print("quality = top-1 agreement with the uncompressed model on random inputs\n")
    print(markdown_table(["trial", "val agreement", "test agreement", "latency ms", "speedup", "policy"], rows)
          if rows else "no policy met the budget")
    trials = result.trials
    named = trials[trials["baseline"].fillna("").astype(str).str.len() > 0]
    print("\nthe baselines of the same run (each measured end to end): no single technique reaches the budget\n")
    print(markdown_table(["trial", "baseline", "latency ms", "speedup", "within budget"],
                         [(int(r["number"]), r["baseline"], r["latency_ms"], base["latency_ms"] / r["latency_ms"],
                           "yes" if r["feasible"] else "no") for _, r in named.iterrows()]))
    best = result.best or {}
    feasible = trials[trials["feasible"].fillna(False).astype(bool)]
    first = None if feasible.empty else int(feasible["number"].min())
    print(f"\nfirst trial within {args.budget:g}x: " + ("none" if first is None else
          f"#{first} ({feasible.set_index('number').loc[first, 'origin']})") + f"; wall time {wall / 60:.1f} min")
    path = write_json("deit_budget", {
        "first_feasible_trial": first, "wall_s": wall, "log": lines,
        "baselines": named[["number", "baseline", "latency_ms", "feasible"]].to_dict("records"),
        "feasible_trials": int(trials["feasible"].sum()),
        "budget": args.budget, "trials": args.trials, "baseline": base,
        "best": best, "speedup": (base["latency_ms"] / best["latency_ms"]) if best else None,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
