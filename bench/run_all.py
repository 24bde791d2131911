"""Run every benchmark in one process run per script, side by side, and collect the markdown they print.

    python bench/run_all.py [--only NAME ...] [--quick]

Writes bench/results/*.json (one per benchmark) and bench/results/SUMMARY.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: name -> (script, normal args, quick args)
BENCHMARKS = {
    "quantization_kernels": ("quantization_kernels.py", [], ["--repeats", "7"]),
    "lowrank": ("lowrank.py", [], []),
    "pruning": ("pruning.py", [], []),
    "distillation": ("distillation_recovery.py", [], ["--skip-fixed", "--steps", "50"]),
    "latency_model": ("latency_model.py", [], []),
    "deit_budget": ("deit_budget.py", [], ["--trials", "20"]),
    "search_quality": ("search_quality.py", [], ["--trials", "20", "--random-factor", "2", "--budgets", "0.5"]),
    "overhead": ("overhead.py", [], ["--trials", "8"]),
    "distributed": ("distributed.py", [], []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer trials and repeats (minutes, not an hour)")
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    sections = [f"# autocompress benchmarks, {datetime.date.today().isoformat()}\n"]
    failed = []
    for name in names:
        script, normal, quick = BENCHMARKS[name]
        if not (HERE / script).is_file():
            sections.append(f"## {name}\n\n(not present)\n")
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else normal)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        body = "\n".join(l for l in proc.stdout.splitlines() if l.startswith(("#", "|", "quality", "wrote", "")))
        print(proc.stdout[-4000:])
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-2000:], file=sys.stderr)
            body += f"\n\nFAILED (exit {proc.returncode})"
        sections.append(f"## {name}\n{body}\n")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "SUMMARY.md").write_text("\n".join(sections))
    print(f"wrote {HERE / 'results' / 'SUMMARY.md'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
