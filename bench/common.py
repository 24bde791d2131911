"""Helpers shared by the benchmark scripts: machine description, markdown tables, JSON output."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from autocompress.cpu import cpu_info



def cpu_folder() -> str:
    """bench/results/<this>: results are kept per CPU kind ('avx512-amx', 'avx512-bf16', 'avx2', 'avx2-capped-on-avx512-amx'),
    so a run on one kind never overwrites the figures of another."""
    label = cpu_info().label.lower().replace("avx-512", "avx512").replace("capped on", "capped-on")
    return re.sub(r"[^a-z0-9]+", "-", label).strip("-")


RESULTS = Path(__file__).resolve().parent / "results" / cpu_folder()


def machine() -> dict[str, Any]:
    """Where the figures came from: date, CPU model, the kernels torch could use (capability, the flags that decide
    bf16/int8 speed, any AVX2 caps) and the threads. Every result file carries it."""
    info = cpu_info()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": info.model,
        "cpu_kind": info.label,
        "cpu_capability": info.capability,
        "cpu_flags": list(info.flags),
        "cpu_caps": info.caps,
        "cores": info.cores,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    """numpy scalars and other strays, for JSON."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
