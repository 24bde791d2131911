"""Trials per hour with 1 and 2 workers, on this machine: Optuna workers sharing a journal storage, and Ray Tune.

Each configuration runs the demo ViT (its cached checkpoint) on a space without recovery training (quantization and
low rank), one thread per trial, as real ``autocompress search`` processes:

* storage, N workers: N processes ``--storage journal:PATH`` started together (``--trials`` is their total);
* ray, N workers: one process ``--backend ray --max-concurrent N --cpus-per-trial 1`` starting a local Ray.

Two rates: over the trial phase (first trial start to last trial end, from the study's timestamps) and end to end
(process start to exit, which adds Python, data and model loading, the baseline, Ray's start and the final report).
For Ray the trial phase also holds the start of the trial workers (a trial is asked for before its worker exists).
The machine is shared and has 2 cores: the rates say what a second worker buys here, not on a cluster.

    python bench/distributed.py [--trials 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

import optuna  # noqa: E402
import yaml  # noqa: E402
from autocompress.search.study import record_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "runs" / "distributed"
SPACE = {"techniques": {
    "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))",
                                 "format": ["fp32", "bf16", "int8_dynamic"]}, {"match": "head", "format": ["fp32", "bf16"]}]},
    "lowrank": {"layers": [{"match": "re:blocks\\.\\d+\\.mlp\\.(fc1|fc2)", "rank": [0.25, 0.5]}]},
}}


def write_config(trials: int) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "fashion_mnist.yaml").read_text())
    examples = ROOT / "examples"
    config["model"]["checkpoint"] = str((examples / config["model"]["checkpoint"]).resolve())
    config["model"].pop("train_if_missing", None)
    config["target"]["threads"] = 1
    config["search"]["trials"] = trials
    space = WORK / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    config["space"] = str(space)
    config["budget"] = "latency=0.7x"
    path = WORK / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_mode(mode: str, workers: int, config: Path) -> dict:
    out = WORK / f"{mode}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "autocompress.cli", "search", str(config), "--no-progress"]
    if mode == "storage":
        journal = out / "study.journal"
        commands = [base + ["--storage", f"journal:{journal}", "--out", str(out / f"w{i}")] for i in range(workers)]
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    else:
        commands = [base + ["--backend", "ray", "--max-concurrent", str(workers), "--cpus-per-trial", "1",
                            "--out", str(out)]]
        storage = f"sqlite:///{out / 'study.db'}"
    began = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in commands]
    logs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - began
    for p, log in zip(procs, logs):
        if p.returncode not in (0, 3):  # 3: no policy met the budget, still a complete run
            raise SystemExit(f"{mode} x{workers} failed (exit {p.returncode}):\n{log[-3000:]}")
    study = optuna.load_study(study_name="autocompress", storage=storage)
    trials = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("surplus")
              and not t.user_attrs.get("interrupted")]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    phase = (end - start).total_seconds()
    per_trial = [record_of(t).get("duration_s") or 0.0 for t in trials]
    return {"mode": mode, "workers": workers, "trials": len(trials), "trial_phase_s": phase, "wall_s": wall,
            "trials_per_hour_trial_phase": 3600 * len(trials) / phase, "trials_per_hour_end_to_end": 3600 * len(trials) / wall,
            "mean_trial_s": sum(per_trial) / len(per_trial), "nodes": sorted({str(record_of(t).get("node")) for t in trials})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    config = write_config(args.trials)
    load_before = os.getloadavg()
    results = [run_mode(mode, n, config) for mode in ("storage", "ray") for n in (1, 2)]
    load_after = os.getloadavg()
    rows = [(r["mode"], r["workers"], r["trials"], r["mean_trial_s"], r["trial_phase_s"],
             r["trials_per_hour_trial_phase"], r["wall_s"], r["trials_per_hour_end_to_end"]) for r in results]
    lines = [f"### trials per hour, 1 vs 2 workers ({args.trials} trials, demo ViT, 1 thread per trial, "
             f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after)", "",
             markdown_table(["mode", "workers", "trials", "mean trial s", "trial phase s", "trials/h (trial phase)",
                             "wall s", "trials/h (end to end)"], rows)]
    for mode in ("storage", "ray"):
        one, two = (r for r in results if r["mode"] == mode)
        lines += ["", f"{mode}: 2 workers give "
                  f"{two['trials_per_hour_trial_phase'] / one['trials_per_hour_trial_phase']:.2f}x the trial-phase rate "
                  f"of 1, {two['trials_per_hour_end_to_end'] / one['trials_per_hour_end_to_end']:.2f}x end to end"]
    markdown = "\n".join(lines)
    print("\n" + markdown)
    path = write_json("distributed", {"trials": args.trials, "load_average": {"before": load_before, "after": load_after},
                                      "results": results, "markdown": markdown})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
