"""Builtin runtime plugin: ONNX Runtime and OpenVINO as places to run and time a compressed model.

Registered through the ``autocompress`` entry-point group like any third-party plugin; each runtime needs its extra
(``pip install 'autocompress[onnx]'`` / ``[openvino]``) only when a config asks for it (``target.runtime``).

A model is prepared exactly as ``autocompress export`` writes it (:func:`autocompress.export.build_onnx`: plugins
make their modules exportable, int8 layers become QDQ), into a temporary folder, then loaded into the runtime's
session with the target's threads. The activation scales of int8 layers come from the first images of the timed
batch: a timing does not depend on their values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from autocompress.hookspecs import hookimpl
from autocompress.runtime import Runtime

__all__ = ["ONNXRuntime", "OpenVINORuntime", "autocompress_register_runtimes"]

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


@hookimpl
def autocompress_register_runtimes(register):
    register(ONNXRuntime())
    register(OpenVINORuntime())
