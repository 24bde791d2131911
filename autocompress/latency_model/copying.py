"""Cheap copies of a model for the profiler: deep-copy only the subtrees a setting changes, share the rest.

Profiling realises hundreds of layer variants, each applied to a model that must stay the uncompressed one
afterwards. A deep copy of the whole model per variant costs more than timing it; here only the changed subtrees
(``blocks.3``) are deep-copied, the modules on the path to them (the model, ``blocks``) get copies of their own that
still hold the same other children, parameters and buffers, and everything else is the same object as in the
original. Applying a setting to a copied subtree, or replacing it, leaves the original untouched.

Everything goes through public APIs: ``copy.deepcopy`` with a memo that maps a module's own children and tensors to
themselves (so they are kept, not copied), ``get_submodule`` and ``register_module``.
"""

from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

__all__ = ["path_copy", "path_copy_many", "shallow_copy"]


def path_copy(model: nn.Module, subtree: str) -> nn.Module:
    """A copy of ``model`` whose module ``subtree`` is deep-copied and whose modules on the path to it are
    shallow-copied (:func:`shallow_copy`); everything else is shared. ``""`` deep-copies the whole model."""
    if not subtree:
        return copy.deepcopy(model)
    return path_copy_many(model, [subtree])


def path_copy_many(model: nn.Module, subtrees: Iterable[str]) -> nn.Module:
    """:func:`path_copy` for several disjoint subtrees at once: a module on the path to two of them is copied once."""
    root = shallow_copy(model)
    copied = {id(root)}
    for subtree in subtrees:
        parent = root
        parts = subtree.split(".")
        for i, part in enumerate(parts):
            child = parent.get_submodule(part)
            if i == len(parts) - 1:
                new = copy.deepcopy(child)
            elif id(child) in copied:
                new = child  # already copied for an earlier subtree
            else:
                new = shallow_copy(child)
                copied.add(id(new))
            parent.register_module(part, new)
            parent = new
    return root


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with containers of its own that hold the same children, parameters and buffers: a child
    registered on the copy replaces it there only. Its other attributes (plain settings, hook tables) are copied."""
    keep = {id(child): child for _, child in module.named_children()}
    keep.update((id(t), t) for _, t in module.named_parameters(recurse=False))
    keep.update((id(t), t) for _, t in module.named_buffers(recurse=False))
    return copy.deepcopy(module, keep)
