"""Runtimes: where the compressed model will run, and so where its latency is measured.

A search times every candidate in the config's ``target.runtime``, paired with the uncompressed model prepared the
same way in the same runtime, with the target's threads: the runtime alone changes which choices pay (ONNX Runtime
runs the demo ViT's int8 layers slower than its fp32 ones; torch eager runs them faster).

A runtime is registered through ``autocompress_register_runtimes`` like a technique. The core registers its own
three through that hook (autocompress/builtins.py): ``torch`` (eager, the default), ``onnxruntime`` and ``openvino``;
the last two need their extra installed (``pip install 'autocompress[onnx]'`` / ``[openvino]``) only when a config
asks for them. They prepare a model exactly as ``autocompress export`` writes it (:func:`autocompress.export.build_onnx`:
plugins make their modules exportable, int8 layers become QDQ), into a temporary folder, then load it into the
runtime's session with the target's threads; the activation scales of int8 layers come from the first images of the
timed batch (a timing does not depend on their values).

What a runtime does, :meth:`Runtime.prepare`: turn a realised model and the example batch into a callable that runs
one forward pass of that batch in the runtime (the costs module times the callable); refuse, as an
:class:`~autocompress.errors.InputError` naming the layer, a model it cannot run (a format with no kernel in it).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
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


#: images of the timed batch that set int8 activation scales for timing
CALIBRATION_IMAGES = 32


class _Exported(Runtime):
    target = "onnx"  # what autocompress.export.build_onnx prepares the model for

    def _onnx(self, model, example, plugins, folder: Path) -> Path:
        from autocompress.export import build_onnx

        path = folder / "model.onnx"
        build_onnx(model, self.target, plugins, example[:2], example[:CALIBRATION_IMAGES], path)
        return path


class ONNXRuntime(_Exported):
    name = "onnxruntime"
    label = "ONNX Runtime"
    modules = ("onnx", "onnxruntime", "onnxscript")
    extra = "onnx"

    def version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"

    def prepare(self, model, example, threads, plugins) -> Callable[[], Any]:
        import onnxruntime as ort

        from autocompress.export import INPUT

        with tempfile.TemporaryDirectory(prefix="autocompress-ort-") as folder:
            path = self._onnx(model, example, plugins, Path(folder))
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            # ORT's threads spin after each run by default: with several sessions alive (a candidate timed in
            # turns with the reference), the idle one's spinning threads take the cores from the one being timed
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {INPUT: example.numpy()}
        return lambda: session.run(None, feed)


class OpenVINORuntime(_Exported):
    name = "openvino"
    label = "OpenVINO"
    modules = ("onnx", "onnxruntime", "onnxscript", "openvino")
    extra = "openvino"
    target = "openvino"

    def version(self) -> str:
        import openvino

        return f"openvino {openvino.__version__} CPU f32"

    def prepare(self, model, example, threads, plugins) -> Callable[[], Any]:
        import openvino as ov

        with tempfile.TemporaryDirectory(prefix="autocompress-ov-") as folder:
            path = self._onnx(model, example, plugins, Path(folder))
            core = ov.Core()
            # f32 as exported (a CPU with bf16 would otherwise run f32 layers in bf16 by default: a format the
            # policy did not choose); the int8 layers run int8
            compiled = core.compile_model(core.read_model(str(path)), "CPU", {
                "INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        array = example.numpy()
        return lambda: request.infer([array])


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
