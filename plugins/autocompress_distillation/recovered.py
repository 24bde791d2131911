"""Recovered weights, remembered for the run.

Recovery training is a deterministic function of the student it starts from, the settings, the seed, the teacher and
the training subset. Rebuilding a policy the search already trained (the Pareto set re-evaluated at the end of a run,
a sampler proposing the same policy twice) therefore loads the trained weights instead of training again. The store
is bounded in bytes and forgets the least recently used entries first.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

CACHE_KEY = "distillation.recovered"
MAX_BYTES = 256 * 2**20
_SCALARS = (bool, int, float, str, type(None))


def fingerprint(model: nn.Module) -> str:
    """A digest of everything that decides what training does to ``model``: module types, their scalar settings,
    their hooks, and every tensor of the state dict (bit for bit)."""
    h = hashlib.sha1()
    for name, module in model.named_modules():
        h.update(f"|{name}:{type(module).__module__}.{type(module).__qualname__}".encode())
        for attr, value in sorted(vars(module).items()):
            if attr == "training":
                continue
            if isinstance(value, _SCALARS) or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value)):
                h.update(f"{attr}={value!r};".encode())
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                h.update(getattr(hook, "__qualname__", type(hook).__qualname__).encode())
    for key, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().reshape(-1)
        h.update(f"|{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RecoveredStore:
    """Trained state dicts keyed by (student fingerprint, settings, seed), valid for one teacher and one subset."""

    def __init__(self, teacher: nn.Module, data_key: tuple, max_bytes: int = MAX_BYTES) -> None:
        self._teacher = weakref.ref(teacher)
        self.data_key = data_key
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._bytes = 0

    @classmethod
    def for_run(cls, cache: dict[str, Any], teacher: nn.Module, images: torch.Tensor) -> "RecoveredStore":
        data_key = (images.data_ptr(), tuple(images.shape))
        store = cache.get(CACHE_KEY)
        if not isinstance(store, cls) or store._teacher() is not teacher or store.data_key != data_key:
            store = cache[CACHE_KEY] = cls(teacher, data_key)
        return store

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, model: nn.Module) -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        size = sum(t.numel() * t.element_size() for t in state.values())
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[1]
        self._entries[key] = (state, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
