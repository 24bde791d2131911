"""What decides a module's speed, and what it gets as input, for the profiler's deduplication and in-context timing.

A structure signature digests a module's classes, scalar settings, hooks, tensor shapes, dtypes and layouts (not
its weight values), so two same-shaped layers in the same format share one; :func:`capture` records the inputs each
layer really gets inside a model, so a variant can be realised and checked on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Captured:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_shape: Any = None


def capture(model: nn.Module, root: str, names: list[str], args: tuple, kwargs: dict) -> dict[str, Captured]:
    """Run ``model``'s submodule ``root`` on ``(args, kwargs)``; the input and output shape of each of ``names``
    (submodules of ``model``, first call each) in that run. Names the run never calls are left out."""
    found: dict[str, Captured] = {}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue

        def pre(mod, a, kw, name=name):
            if name not in found:
                found[name] = Captured(_clone(a), _clone(kw))

        def post(mod, a, output, name=name):
            if name in found and found[name].out_shape is None:
                found[name].out_shape = shapes(output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.inference_mode():
            model.get_submodule(root)(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


def has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def structure_signature(module: nn.Module) -> str:
    """A digest of what decides a module's speed: module classes, scalar settings, hooks, tensor shapes, dtypes and
    layouts. Weight values are left out, so the same format of a same-shaped layer in two blocks has one signature.
    """
    parts = []
    for name, m in module.named_modules():
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and _is_scalar(v))
        tensors = [(n, tuple(t.shape), str(t.dtype), str(t.layout))
                   for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None]
        hooks = [getattr(h, "__qualname__", type(h).__name__)
                 for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]]
        parts.append((name, f"{type(m).__module__}.{type(m).__qualname__}", attrs, tensors, hooks))
    return _digest(repr(parts))


def unit_signature(unit: nn.Module, args: tuple, kwargs: dict) -> str:
    return _digest(structure_signature(unit) + "|" + repr(shapes(args)) + "|" + repr(shapes(kwargs)))


def failure(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {exc}"[:200]


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def shapes(value: Any) -> Any:
    if _is_scalar(value):
        return value
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return tuple(shapes(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, shapes(v)) for k, v in value.items()))
    return type(value).__name__
