"""How much one choice on one layer damages the model, with everything else left as it is.

The damage of a setting is the KL divergence of the compressed model's output distribution from the uncompressed
model's, averaged over a fixed calibration set (the first ``data.calibration_size`` training images: never the
validation split the search chooses on, never the test split). The identity setting's damage is zero by
definition and never measured. Damages are kept per run in ``sensitivity.json`` (keyed by the settings), so a
resumed run, or a second solve, scores nothing again.

Scoring applies the setting exactly as a trial does (same techniques, same calibration data), minus recovery
training: the solver must know what a choice costs in accuracy before anything trains it back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.io import atomic_write_text

__all__ = ["Sensitivity", "kl_damage"]

FORMAT = "autocompress.sensitivity/1"
SAVE_EVERY = 25  # settings scored between two saves of sensitivity.json


def kl_damage(reference_logits: torch.Tensor, model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean KL(uncompressed || compressed) over ``images``, in nats; NaN outputs count as infinite damage."""
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out = model(images[start : start + batch_size]).float()
            if not bool(torch.isfinite(out).all()):
                return math.inf
            ref = reference_logits[start : start + batch_size]
            total += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="sum", log_target=True))
    return max(0.0, total / max(1, len(images)))


class Sensitivity:
    """Damage per settings key, measured on demand and remembered in a file.

    ``compress(params) -> model`` builds the model of one setting (the run's own way of compressing); ``images`` are
    the calibration images.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, compress: Callable[[dict[str, Any]], nn.Module],
                 path: Path | None = None, fingerprint: Mapping[str, Any] | None = None) -> None:
        self.model, self.images, self.compress = model, images, compress
        self.path = path
        self.fingerprint = dict(fingerprint or {})
        self.damage: dict[str, float] = {}
        self.measured = 0  # scored by this object (not loaded)
        self.seconds = 0.0
        self._reference: torch.Tensor | None = None
        if path is not None and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # unreadable: scored again (it only costs time)
        if data.get("format") == FORMAT and data.get("fingerprint") == json.loads(json.dumps(self.fingerprint)):
            self.damage = {str(k): float(v) for k, v in (data.get("damage") or {}).items()}

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                                                     "damage": self.damage}, indent=1, sort_keys=True))

    @property
    def reference(self) -> torch.Tensor:
        if self._reference is None:
            from autocompress.evaluate import logits

            self._reference = logits(self.model, self.images)
        return self._reference

    def measure(self, wanted: Iterable[tuple[str, dict[str, Any]]], progress: bool = False,
                on_error: Callable[[str, Exception], None] | None = None) -> dict[str, float]:
        """Damage of each ``(key, params)``; the empty key (identity) is 0. A setting that fails to apply is
        infinitely damaging (the solver never chooses it) and reported through ``on_error``."""
        from tqdm.auto import tqdm

        wanted = list(dict(wanted).items())
        todo = [(k, p) for k, p in wanted if k and k not in self.damage]
        started = time.perf_counter()
        for key, params in tqdm(todo, desc="sensitivity", unit="setting", disable=not progress or not todo,
                                dynamic_ncols=True, leave=False):
            try:
                candidate = self.compress(params)
                self.damage[key] = kl_damage(self.reference, candidate, self.images)
                del candidate
            except Exception as exc:  # noqa: BLE001 - a technique's failure only rules its setting out
                self.damage[key] = math.inf
                if on_error is not None:
                    on_error(key, exc)
            self.measured += 1
            if self.measured % SAVE_EVERY == 0:
                self.save()  # a run killed while scoring keeps what it scored (--resume scores the rest)
        self.seconds += time.perf_counter() - started
        if todo:
            self.save()
        return {k: (0.0 if not k else self.damage[k]) for k, _ in wanted}
