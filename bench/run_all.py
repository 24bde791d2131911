"""Run every benchmark in one process run per script, side by side, and collect the markdown they print.

    python bench/run_all.py [--only NAME ...] [--quick]

Writes, under bench/results/CPU/ (CPU: this machine's kind as torch sees it, e.g. ``avx512-amx``, ``avx512-bf16`` or ``avx2``; run
with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 for ``avx2-capped-on-...``), NAME.json (one per benchmark),
each benchmark's printed tables to NAME.md, and SUMMARY.md: every NAME.md present, in the order below (so
``--only`` refreshes some sections and keeps the others, each with the date it was taken).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

from common import RESULTS

from autocompress.cpu import cpu_info

HERE = Path(__file__).resolve().parent
#: name -> (script, normal args, quick args)
BENCHMARKS = {
    "quantization_kernels": ("quantization_kernels.py", [], ["--repeats", "7"]),
    "lowrank": ("lowrank.py", [], []),
    "pruning": ("pruning.py", [], []),
    "token_merging": ("token_merging.py", [], ["--repeats", "7"]),
    "distillation": ("distillation_recovery.py", [], ["--skip-fixed", "--steps", "50"]),
    "latency_model": ("latency_model.py", [], []),
    "memory_accounting": ("memory_accounting.py", [], ["--policies", "10"]),
    "deit_budget": ("deit_budget.py", [], ["--trials", "20"]),
    "search_quality": ("search_quality.py", [], ["--trials", "20", "--random-factor", "0", "--budgets", "0.5", "--methods", "solve,sample"]),
    "overhead": ("overhead.py", [], ["--trials", "8"]),
    "distributed": ("distributed.py", [], []),
}


def tables(stdout: str) -> str:
    """What a benchmark printed for people (headings, markdown tables, summary lines), without its progress lines."""
    keep = [line for line in stdout.splitlines()
            if not line.strip() or line.startswith(("#", "|", "quality", "wall-clock", "note", "target"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer trials and repeats (minutes, not an hour)")
    parser.add_argument("--reuse-random", action="store_true",
                        help="search_quality: reuse its finished random-search run (the longest part)")
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    results = RESULTS
    results.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        script, normal, quick = BENCHMARKS[name]
        if not (HERE / script).is_file():
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else normal)]
        if args.reuse_random and name == "search_quality":
            cmd.append("--reuse-random")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        body = tables(proc.stdout)
        print(proc.stdout[-4000:])
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-2000:], file=sys.stderr)
            body += f"\n\nFAILED (exit {proc.returncode})"
        taken = f"taken {datetime.datetime.now().isoformat(timespec='minutes')}{' (--quick)' if args.quick else ''}"
        (results / f"{name}.md").write_text(f"## {name}\n\n{taken}: `{' '.join(cmd[1:])}`\n\n{body}\n")
    sections = [f"# autocompress benchmarks on {cpu_info().label} ({cpu_info().model})\n"]
    sections += [(results / f"{n}.md").read_text() for n in BENCHMARKS if (results / f"{n}.md").is_file()]
    (results / "SUMMARY.md").write_text("\n".join(sections))
    print(f"wrote {results / 'SUMMARY.md'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
