"""How much one choice on one layer damages the model, with everything else left as it is.

The damage of a setting is the KL divergence of the compressed model's output distribution from the uncompressed
model's, averaged over a fixed calibration set (the first ``data.calibration_size`` training images: never the
validation split the search chooses on, never the test split). The identity setting's damage is zero by
definition and never measured. Damages are kept per run in ``sensitivity.json`` (keyed by the settings), so a
resumed run, or a second solve, scores nothing again.

Scoring applies the setting exactly as a trial does (same techniques, same calibration data), minus recovery
training: the solver must know what a choice costs in accuracy before anything trains it back.

Most of a score is the compressed model's forward pass over the calibration images. A setting on block ``k`` of a
model whose blocks run as one ``nn.Sequential`` (timm's ViT, DeiT) leaves blocks ``0..k-1`` exactly as they were,
so their output is taken from the uncompressed model's pass (kept once per block, within ``PREFIX_BYTES``) and only
blocks ``k..`` and what follows them run: on the demo ViT this halves the pass on average. Models whose blocks are
called one by one with extra arguments (BEiT, EVA) run whole.
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
#: at most this many bytes of the uncompressed model's block inputs are kept to skip unchanged blocks
PREFIX_BYTES = 256 * 2**20


def kl_damage(reference_logits: torch.Tensor, model: nn.Module, images: torch.Tensor, batch_size: int = 256,
              prefix: "_Prefix | None" = None) -> float:
    """Mean KL(uncompressed || compressed) over ``images``, in nats; NaN outputs count as infinite damage.
    ``prefix``: the uncompressed model's input to the first block that differs (its earlier blocks are skipped)."""
    model.eval()
    total = 0.0
    with torch.inference_mode(), (prefix.skipping(model) if prefix is not None else _nothing()) as feed:
        for start in range(0, len(images), batch_size):
            if feed is not None:
                feed.current = prefix.inputs[start : start + batch_size]
            out = model(images[start : start + batch_size]).float()
            if not bool(torch.isfinite(out).all()):
                return math.inf
            ref = reference_logits[start : start + batch_size]
            total += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="sum", log_target=True))
    return max(0.0, total / max(1, len(images)))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _Feed(nn.Module):
    """Stands for the skipped blocks: returns the uncompressed model's input to the first block that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.current: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.current


class _Prefix:
    """The uncompressed model's input to block ``index`` of the Sequential ``container``, for every image."""

    def __init__(self, container: str, index: int, inputs: torch.Tensor) -> None:
        self.container, self.index, self.inputs = container, index, inputs

    def skipping(self, model: nn.Module):
        """Within it, ``model``'s blocks before ``index`` are one :class:`_Feed` (returned), put back after."""
        import contextlib

        @contextlib.contextmanager
        def swap():
            blocks = model.get_submodule(self.container)
            parent_name, _, attr = self.container.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            feed = _Feed()
            setattr(parent, attr, nn.Sequential(feed, *list(blocks)[self.index:]))
            try:
                yield feed
            finally:
                setattr(parent, attr, blocks)

        return swap()


class Sensitivity:
    """Damage per settings key, measured on demand and remembered in a file.

    ``compress(params) -> model`` builds the model of one setting (the run's own way of compressing); ``images`` are
    the calibration images.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, compress: Callable[[dict[str, Any]], nn.Module],
                 path: Path | None = None, fingerprint: Mapping[str, Any] | None = None,
                 identities: Mapping[str, Any] | None = None) -> None:
        self.model, self.images, self.compress = model, images, compress
        self.identities = identities  # the space's identity values: with them, unchanged blocks are skipped
        self.path = path
        self.fingerprint = dict(fingerprint or {})
        self.damage: dict[str, float] = {}
        self.measured = 0  # scored by this object (not loaded)
        self.seconds = 0.0
        self._reference: torch.Tensor | None = None
        self._prefixes: dict[tuple[str, int], _Prefix] | None = None
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

    def prefix_for(self, params: Mapping[str, Any], identities: Mapping[str, Any]) -> _Prefix | None:
        """Where the compressed model of ``params`` first differs: the kept input of that block, or None (a global
        option, a layer outside the blocks, or blocks that are not one Sequential)."""
        if self._prefixes is None:
            self._prefixes = self._capture()
        changed = [name.partition(":")[0] for name, value in params.items()
                   if ":" in name and value != identities.get(name)]
        if not changed:
            return None
        found = []
        for layer in changed:
            match = [key for key in self._prefixes if layer.startswith(f"{key[0]}.{key[1]}.") or
                     layer == f"{key[0]}.{key[1]}"]
            if not match:
                return None
            found.append(match[0])
        return self._prefixes[min(found, key=lambda k: k[1])]

    def _capture(self) -> dict[tuple[str, int], _Prefix]:
        """Inputs of each block of the model's Sequential block containers, over the images (within PREFIX_BYTES)."""
        out: dict[tuple[str, int], _Prefix] = {}
        for name, module in self.model.named_modules():
            if not (isinstance(module, nn.Sequential) and len(module) > 1 and name):
                continue
            if any(name.startswith(c + ".") for c, _ in out):
                continue
            seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(1, len(module))}
            handles = [module[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
                       for i in seen]
            try:
                with torch.inference_mode():
                    for start in range(0, len(self.images), 256):
                        self.model(self.images[start : start + 256])
            except Exception:
                continue
            finally:
                for h in handles:
                    h.remove()
            if not all(len(v) and all(isinstance(t, torch.Tensor) for t in v) for v in seen.values()):
                continue
            inputs = {i: torch.cat(v) for i, v in seen.items()}
            if sum(t.numel() * t.element_size() for t in inputs.values()) > PREFIX_BYTES:
                continue
            for i, t in inputs.items():
                out[(name, i)] = _Prefix(name, i, t)
        return out

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
                prefix = self.prefix_for(params, self.identities) if self.identities is not None else None
                if prefix is not None and not _same_blocks(self.model, candidate, prefix):
                    prefix = None  # a global option changed the earlier blocks too (compute=bf16): run it whole
                self.damage[key] = kl_damage(self.reference, candidate, self.images, prefix=prefix)
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


def _same_blocks(model: nn.Module, candidate: nn.Module, prefix: _Prefix) -> bool:
    """Whether ``candidate``'s blocks before ``prefix.index`` are the uncompressed model's: same structure and the
    same tensors (so their output is the kept one)."""
    from autocompress.latency_model.profiler import structure_signature

    try:
        ours, theirs = model.get_submodule(prefix.container), candidate.get_submodule(prefix.container)
    except AttributeError:
        return False
    for i in range(prefix.index):
        a, b = ours[i], theirs[i]
        if a is b:
            continue
        if structure_signature(a) != structure_signature(b):
            return False
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True
