"""The latency lookup table as a file: measured entries keyed by layer and settings, for one target.

A table holds measurements of one model architecture on one machine, torch version and target (threads, batch
size, input shape); its ``key`` says which, and a file whose key differs is never reused. By default tables live in
the user's cache (``$AUTOCOMPRESS_CACHE_DIR`` or ``~/.cache/autocompress``) under a name derived from the key, so
every run on the same target finds the table the previous one left.

File layout (JSON)::

    {"format": "autocompress.latency_table/1",
     "key": {"hardware": ..., "torch": ..., "model": {...}, "target": {...}},
     "techniques": {"quantization": "autocompress==0.1.0", ...},   # who produced the variants
     "base_ms": 41.2,                                  # the uncompressed model end to end
     "entries": {"blocks.0.attn.qkv": {
         "": {"ms": 1.9, "how": "in context"},           # the uncompressed layer, timed inside the model
         "blocks.0.attn.qkv:quantization.format=\"bf16\"": {"ratio": 0.61, "how": "measured", "sig": "..."},
         "blocks.0:tome.r=8": {"delta": -0.12, "how": "end to end"}},   # fraction of base_ms
       "": {"": {"ms": 41.2, "how": "in context"},       # the model itself under global options
            "quantization.compute=\"bf16\"": {"ratio": 0.7, "how": "measured", "sig": "..."}}},
     "global_options": {"distillation.steps=100": {"structural": false}}}   # neutral: costs nothing

An entry's time is ``identity ms * ratio`` or ``identity ms + delta * base_ms``: the ratios and deltas were timed
interleaved with their reference, so they hold when the machine's load shifts; the identity times and ``base_ms``
come from the same rounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autocompress.cpu import cpu_info
from autocompress.errors import InputError
from autocompress.io import atomic_write_text
from autocompress.latency_model.layout import techniques_in_key

FORMAT = "autocompress.latency_table/1"
CACHE_ENV = "AUTOCOMPRESS_CACHE_DIR"


def hardware_id() -> str:
    """The CPU model, the kernels torch may use on it (a process held to AVX2 on an AVX-512 CPU times other
    kernels) and the core count the timings belong to."""
    info = cpu_info()
    return f"{info.model} | {platform.machine()} | {info.capability} | {info.cores} cpus"


def table_key(
    model_name: str, model_kwargs: dict[str, Any], structure: str, threads: int, batch_size: int,
    input_shape: tuple[int, ...], dtype: str = "float32", runtime: str | None = None,
) -> dict[str, Any]:
    """What a table's timings depend on. ``structure`` is a hash of the model's modules and tensor shapes, so two
    models that share a name but not an architecture (a user's own module classes) never share a table.
    ``runtime``: the runtime and version a table not timed in torch eager was timed in (torch eager's tables carry
    none, as before runtimes existed, so they stay valid)."""
    key = {
        "hardware": hardware_id(),
        "torch": torch.__version__,
        "model": {"name": model_name, "kwargs": _plain(model_kwargs), "structure": structure},
        "target": {"threads": int(threads), "batch_size": int(batch_size), "input_shape": list(input_shape),
                   "dtype": dtype},
    }
    if runtime:
        key["runtime"] = runtime
    return key


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "autocompress"


def default_table_path(key: dict[str, Any]) -> Path:
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in key["model"]["name"]) or "model"
    return cache_dir() / "latency_tables" / f"{name}-{key_digest(key)}.json"


@dataclass
class LatencyTable:
    """Measured latencies (milliseconds) of layer variants and of the uncompressed model, for one ``key``."""

    key: dict[str, Any]
    techniques: dict[str, str] = field(default_factory=dict)
    base_ms: float | None = None
    entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    global_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    def entry(self, layer: str, key: str) -> dict[str, Any] | None:
        return self.entries.get(layer, {}).get(key)

    def has(self, layer: str, key: str) -> bool:
        return key in self.entries.get(layer, {})

    def put(self, layer: str, key: str, entry: dict[str, Any]) -> None:
        self.entries.setdefault(layer, {})[key] = entry

    def count(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def neutral_options(self, settings: list[tuple[str, Any]]) -> set[str]:
        """Global options whose every listed value was found to leave the model's structure unchanged."""
        from autocompress.latency_model.layout import settings_key

        by_param: dict[str, list[bool]] = {}
        for param, value in settings:
            entry = self.global_options.get(settings_key([(param, value)]))
            by_param.setdefault(param, []).append(entry is not None and not entry.get("structural", True))
        return {param for param, flags in by_param.items() if all(flags)}

    def forget_techniques(self, versions: dict[str, str]) -> list[str]:
        """Drop entries made by a technique whose plugin version differs from ``versions``; returns those names."""
        stale = {t for t, v in self.techniques.items() if t in versions and versions[t] != v}
        if stale:
            for layer in list(self.entries):
                self.entries[layer] = {k: e for k, e in self.entries[layer].items() if not techniques_in_key(k) & stale}
            self.global_options = {k: e for k, e in self.global_options.items() if not techniques_in_key(k) & stale}
        self.techniques.update(versions)
        return sorted(stale)

    # --- file -----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "key": self.key, "techniques": dict(sorted(self.techniques.items())),
            "base_ms": self.base_ms, "entries": self.entries, "global_options": self.global_options,
        }

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else (self.path or default_table_path(self.key))
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, key: dict[str, Any] | None = None, field: str = "latency table") -> "LatencyTable":
        """Read a table; with ``key``, a file made for another target or model is an :class:`InputError`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise InputError(field, f"cannot read {path} ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            why = f"bad JSON: {exc.msg} at line {exc.lineno}"
            raise InputError(field, f"{path} is not a latency table ({why})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(field, f"{path} is not a latency table (expected format {FORMAT})")
        if key is not None and data.get("key") != key:
            differs = _first_difference(data.get("key"), key)
            raise InputError(field, f"{path} was profiled for another target ({differs} differs); use --force to "
                                    "replace it or choose another file")
        return cls(
            key=data["key"], techniques=dict(data.get("techniques") or {}), base_ms=data.get("base_ms"),
            entries={k: dict(v) for k, v in (data.get("entries") or {}).items()},
            global_options=dict(data.get("global_options") or {}), path=path,
        )

    @classmethod
    def open(cls, key: dict[str, Any], path: str | Path | None = None, fresh: bool = False,
             field: str = "latency table") -> "LatencyTable":
        """The table for ``key`` at ``path`` (default: the cache), or a new empty one."""
        path = Path(path) if path is not None else default_table_path(key)
        if path.is_file() and not fresh:
            return cls.load(path, key, field=field)
        return cls(key=key, path=path)


def _first_difference(old: Any, new: Any, where: str = "key") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _first_difference(old.get(k), new.get(k), f"{where}.{k}")
    return where


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
