"""Runtimes: where the compressed model will run, and so where its latency is measured.

A search times every candidate in the config's ``target.runtime``, paired with the uncompressed model prepared the
same way in the same runtime, with the target's threads: the runtime alone changes which choices pay (ONNX Runtime
runs the demo ViT's int8 layers slower than its fp32 ones; torch eager runs them faster).

A runtime is registered through ``autocompress_register_runtimes`` like a technique. ``torch`` (eager, the default)
is part of the core; ``onnxruntime`` and ``openvino`` come with the builtin plugin ``autocompress_runtimes`` and
need their extra installed (``pip install 'autocompress[onnx]'`` / ``[openvino]``).

What a runtime does, :meth:`Runtime.prepare`: turn a realised model and the example batch into a callable that runs
one forward pass of that batch in the runtime (the costs module times the callable); refuse, as an
:class:`~autocompress.errors.InputError` naming the layer, a model it cannot run (a format with no kernel in it).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from autocompress.pluginmanager import Plugins

#: the runtime of a config that names none
DEFAULT = "torch"


class Runtime:
    """One runtime. Subclass it, set ``name`` (and ``modules``/``extra`` for what it imports), implement
    :meth:`prepare`."""

    name: str = ""
    label: str = ""  # for people: "ONNX Runtime"
    modules: tuple[str, ...] = ()  # importable modules it needs
    extra: str = ""  # the pip extra that installs them

    def missing(self) -> str | None:
        """Why this runtime cannot be used here (a module not installed), or None."""
        absent = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if not absent:
            return None
        how = f": pip install 'autocompress[{self.extra}]'" if self.extra else ""
        return f"{self.name} needs {', '.join(absent)}, which is not installed{how}"

    def version(self) -> str:
        """What the timings depend on, besides the machine (part of the latency table's key)."""
        return ""

    def prepare(self, model: nn.Module, example: torch.Tensor, threads: int, plugins: "Plugins") -> Callable[[], Any]:
        """A callable running ``model`` on ``example`` once in this runtime (with ``threads`` threads)."""
        raise NotImplementedError


class TorchRuntime(Runtime):
    """torch eager: the model as it is, in ``torch.inference_mode`` (the costs module sets the threads)."""

    name = "torch"
    label = "torch eager"

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def prepare(self, model: nn.Module, example: torch.Tensor, threads: int, plugins: "Plugins") -> Callable[[], Any]:
        model.eval()
        return lambda: model(example)


TORCH = TorchRuntime()


def check_runtime(plugins: "Plugins", name: str, field: str = "target.runtime") -> Runtime:
    """The registered runtime ``name``; unknown or not installed is an :class:`InputError` naming ``field``."""
    from autocompress.errors import InputError

    runtime = plugins.runtimes.get(name)
    if runtime is None:
        raise InputError(field, f"unknown runtime {name!r} (known: {', '.join(sorted(plugins.runtimes))})")
    why = runtime.missing()
    if why:
        raise InputError(field, why)
    return runtime
