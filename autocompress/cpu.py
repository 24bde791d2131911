"""What this CPU's kernels are, as this process sees them: every figure and every speed expectation is keyed to it.

Two CPUs of the same core count can disagree by an order of magnitude on one format: with AVX-512 bf16 (or AMX)
instructions a bf16 GEMM is faster than fp32; on a CPU with AVX2 alone PyTorch emulates it and it is 8-18x slower.
So nothing here assumes a kind: :func:`cpu_info` says what the CPU offers and what torch was allowed to use, and
:func:`bf16_gemm_speedup` measures what that means for the one format whose sign flips between kinds.

torch and oneDNN can be held to AVX2 on an AVX-512 machine (:data:`AVX2_CAPS`, set before torch is imported), so
that one machine shows both behaviours; then the flags still list ``avx512_bf16`` while the capability says AVX2,
and :attr:`CpuInfo.label` says "capped". Whether the cap really slows bf16 down is measured, not assumed.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from autocompress.costs import median_ratio, timed_rounds

__all__ = ["AVX2_CAPS", "FLAGS", "CpuInfo", "bf16_gemm_speedup", "cpu_info", "describe", "slow_bf16_reason"]

#: environment that holds torch (ATen's kernel dispatch) and oneDNN to AVX2 on a CPU that has more
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

#: the /proc/cpuinfo flags that decide which low-precision kernels are fast
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): what ATen dispatches to in this process
    flags: tuple[str, ...]  # those of FLAGS the CPU reports
    caps: dict[str, str]  # AVX2_CAPS-style variables set in this process's environment
    cores: int
    threads: int

    @property
    def label(self) -> str:
        """Short, for tables: 'AVX-512 AMX', 'AVX-512 bf16', 'AVX-512', 'AVX2', or 'AVX2 (capped on AVX-512 AMX)'.

        AMX is named apart from AVX-512 bf16: its tile units make a large bf16 GEMM ~7x faster than fp32 (a Xeon with
        AMX, 2 threads, 1024x768x3072), where AVX-512 bf16 alone (an AMD EPYC) made the demo ViT's bf16 about as fast
        as fp32; the two kinds' figures must not land in one folder."""
        native = "AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else self.capability
        if "amx_bf16" in self.flags:
            native += " AMX"
        elif "avx512_bf16" in self.flags:
            native += " bf16"
        if native.startswith("AVX-512") and not self.capability.upper().startswith("AVX512"):
            return f"{self.capability} (capped on {native})"
        return native

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags), "label": self.label}


def cpu_info() -> CpuInfo:
    model, flags = _read_cpuinfo()
    return CpuInfo(
        model=model or platform.processor() or "unknown cpu",
        capability=str(torch.backends.cpu.get_cpu_capability()),
        flags=tuple(f for f in FLAGS if f in flags),
        caps={k: os.environ[k] for k in AVX2_CAPS if k in os.environ},
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
    )


@functools.lru_cache(maxsize=None)
def bf16_gemm_speedup(m: int = 1024, k: int = 384, n: int = 1152, rounds: int = 7) -> float:
    """fp32 time / bf16 time of one ``(m x k) @ (k x n)`` GEMM in this process (above 1: bf16 is faster here).

    Rounds alternate the two formats and the median of the per-round ratios is kept, so a machine that slows down
    meanwhile slows both alike. About half a second on a CPU where bf16 is emulated, less where it is native."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a16, b16 = a.bfloat16(), b.bfloat16()
    timed = timed_rounds({"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16}, a, warmup=1, repeats=rounds,
                         alternate=True)
    return float(median_ratio(timed["fp32"], timed["bf16"]))


def slow_bf16_reason(min_speedup: float = 1.25) -> str | None:
    """Why a bf16 speed-up cannot be expected on this CPU, or None where a bf16 GEMM measures at least
    ``min_speedup`` x fp32 here. For :class:`~autocompress.testing.SpeedupClaim` ``requires`` and for skips."""
    speedup = bf16_gemm_speedup()
    if speedup >= min_speedup:
        return None
    return (f"bf16 GEMM is not faster than fp32 on this CPU ({cpu_info().label}): measured {speedup:.2f}x the speed "
            f"of fp32, below {min_speedup}x")


@functools.lru_cache(maxsize=1)
def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags, read once per process (they do not change while it runs)."""
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def describe() -> str:
    """Two lines for people and logs (``autocompress cpu``, CI's log): the CPU, its kernels, the bf16 GEMM ratio."""
    info = cpu_info()
    caps = " | caps " + " ".join(f"{k}={v}" for k, v in info.caps.items()) if info.caps else ""
    return (f"cpu: {info.model} | {info.label} | torch capability {info.capability} | flags: {' '.join(info.flags)}"
            f"{caps}\nbf16 GEMM 1024x384 @ 384x1152, {info.threads} threads: {bf16_gemm_speedup():.2f}x the speed of "
            "fp32")
