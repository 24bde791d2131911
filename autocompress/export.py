"""Export a compressed model to ONNX or OpenVINO IR, and check the file against the torch model before keeping it.

    autocompress.export("runs/demo", "onnx", "m.onnx")                          # a run's best model
    autocompress.export("p.yaml", "openvino", "m.xml", config="demo.yaml")     # any policy + config

Pruned, low-rank and distilled layers are plain ``nn.Linear`` modules already: they export as smaller MatMul/Gemm.
What a technique's own modules need first (a custom kernel the exporter cannot trace, a format the file cannot
hold) is each plugin's business, through the ``autocompress_prepare_export`` hook: it swaps such modules for plain
torch ones, names the Linears that must be int8 in the file, or refuses a layer, which stops the export with one line.

Choices, measured on this repository's CPU (AMD EPYC, AVX2):

- The TorchScript-based ``torch.onnx.export`` (``dynamo=False``, opset 18): 0.2 s for the tiny test ViT where the
  ``torch.export``-based exporter took 8-16 s; both give the same graph of MatMul/Gemm, LayerNormalization, Softmax.
- int8 layers become QDQ: QuantizeLinear/DequantizeLinear around their MatMul/Gemm, 8-bit weights per output channel
  (symmetric, from the torch model's dequantized int8 weights), uint8 activations with static scales calibrated on
  the config's calibration images. ONNX Runtime fuses that into QLinearMatMul/QGemm and OpenVINO into u8
  FullyConnected, so one file is int8 in both. The weights' type follows the CPU (``int8_weights="auto"``):
  - int8 (``s8``) where the CPU has VNNI (``avx512_vnni``, ``avx_vnni``, ``amx_int8``): both runtimes' u8 x s8
    kernels accumulate in int32 there. On a Xeon with AMX, 2 threads, every block Linear int8 against the fp32 file
    in the same runtime: DeiT-S 1.90x in ONNX Runtime and 2.90x in OpenVINO with s8 weights, 0.92x and 0.97x with
    u8; the demo ViT 1.00x / 1.22x with s8, 0.80x / 0.58x with u8 (``bench/results/avx512-amx/runtimes.md``).
  - uint8 (``u8``, zero point in the middle) without VNNI: there the u8 x s8 kernels sum pairs of products in
    saturating int16 (AVX2's ``vpmaddubsw``), and the test model's top-1 agreement with torch fell to 91% with s8
    weights on an AMD EPYC with AVX2 (99.6% running the same QDQ graph unfused); with u8 weights it is 99.4%.
  A file is built for the CPU it is exported on: an s8 file run on a CPU without VNNI loses accuracy that way.
  ORT's dynamic quantization (DynamicQuantizeLinear + MatMulInteger) is closer to torch's ``int8_dynamic``, but
  OpenVINO ran it as f32 FullyConnected plus the quantization arithmetic.
- OpenVINO IR is read from that ONNX file (OpenVINO's ONNX frontend) and saved with fp32 weights (``compress_to_fp16=False``); it is
  checked with ``INFERENCE_PRECISION_HINT=f32``, since on CPUs with bf16 units OpenVINO would otherwise run bf16.

The check runs the file in its runtime on validation images next to the torch model: fp32 files must agree within
``1e-4`` of the largest output magnitude, files with int8 layers on the top-1 class of at least 99% of the images.
The files are written to a temporary folder, checked, and only then put at ``out`` (atomically), so a refused or
failing export leaves nothing there.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import nn

from autocompress import rundir
from autocompress.errors import AutocompressError, InputError
from autocompress.evaluate import logits
from autocompress.io import atomic_write
from autocompress.rundir import RunDir

if TYPE_CHECKING:
    from autocompress.pluginmanager import Plugins

FORMATS = ("onnx", "openvino")
#: format -> (modules it needs, the extra that installs them)
REQUIRES = {"onnx": (("onnx", "onnxruntime"), "onnx"), "openvino": (("onnx", "onnxruntime", "openvino"), "openvino")}
OPSET = 18
FP32_TOLERANCE = 1e-4  # max abs error over the largest output magnitude
INT8_AGREEMENT = 0.99  # top-1 agreement with the torch model
INPUT, OUTPUT = "images", "logits"
#: the int8 weight types a QDQ file can hold; "auto" picks this CPU's (see the module docstring)
INT8_WEIGHTS = ("auto", "s8", "u8")
#: CPU flags under which the runtimes' u8 x s8 kernels accumulate without saturating
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

__all__ = ["ExportCheck", "ExportPlan", "ExportResult", "export", "export_model", "int8_weight_type",
           "prepare_for_export"]


@dataclass
class ExportPlan:
    """What the plugins say about one export (filled by ``autocompress_prepare_export``).

    ``int8(layer)``: the Linear module ``layer`` of the prepared model must be int8 in the file. ``refuse(layer,
    reason)``: ``layer`` has no export path to ``target``; the export stops with ``layer: reason``.
    """

    target: str
    int8_layers: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    int8_weights: str = ""  # "s8" or "u8", set when int8 layers were written (see int8_weight_type)

    def int8(self, layer: str) -> None:
        self.int8_layers.append(layer)

    def refuse(self, layer: str, reason: str) -> None:
        self.refused.append((layer, reason))


@dataclass(frozen=True)
class ExportCheck:
    """The exported file against the torch model on the same images."""

    images: int
    max_abs_error: float
    output_scale: float  # largest |output| of the torch model
    agreement: float  # fraction of images with the same top-1 class
    int8: bool  # judged by agreement (int8 layers) rather than by error
    accuracy_torch: float | None = None
    accuracy_exported: float | None = None

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.output_scale, 1e-12)

    @property
    def passed(self) -> bool:
        return self.agreement >= INT8_AGREEMENT if self.int8 else self.relative_error <= FP32_TOLERANCE

    def summary(self, runtime: str) -> str:
        rule = (f"top-1 agreement {100 * self.agreement:.1f}% (needs >= {100 * INT8_AGREEMENT:.0f}%, int8 layers)"
                if self.int8 else f"max abs error {self.relative_error:.1e} of the output scale "
                f"{self.output_scale:.3g} (needs <= {FP32_TOLERANCE:.0e})")
        acc = "" if self.accuracy_torch is None else (
            f"; accuracy torch {self.accuracy_torch:.4f}, {runtime} {self.accuracy_exported:.4f}")
        other = (f"; max abs error {self.max_abs_error:.3g}" if self.int8
                 else f"; top-1 agreement {100 * self.agreement:.1f}%")
        return f"{runtime} vs torch on {self.images} images: {rule}{other}{acc}: {'ok' if self.passed else 'FAILED'}"


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path  # the .onnx file, or the .xml of an OpenVINO IR (its .bin lies beside it)
    files: tuple[Path, ...]
    int8_layers: tuple[str, ...]
    check: ExportCheck
    int8_weights: str = ""  # "s8" or "u8" where there are int8 layers


def export(source: str | Path, format: str, out: str | Path, config: str | Path | None = None,
           check_images: int = 1000, plugins: "Plugins | None" = None, block: Iterable[str] = (),
           int8_weights: str = "auto", log: Callable[[str], None] = print) -> ExportResult:
    """Export a run's best model (``source`` a run directory) or the model a policy makes of a config's model
    (``source`` a policy YAML, ``config`` given) to ``format`` at ``out``, checked on the first ``check_images``
    images of the validation split. ``block``: plugins not to load, besides the config's ``plugins.block``.
    ``int8_weights``: the int8 layers' weight type, ``auto`` (this CPU's), ``s8`` or ``u8``."""
    from autocompress.compose import load_compressed
    from autocompress.config import load_config
    from autocompress.pluginmanager import load_plugins
    from autocompress.policy import Policy
    from autocompress.inputs import load_data
    from autocompress.runner import compress_policy

    check_target(format, out)
    int8_weight_type(int8_weights)  # a bad choice fails before any model is loaded
    source = Path(source)
    if source.is_dir():
        run_dir = RunDir(source)
        best = run_dir.best_model
        if not best.is_file():
            why = f"{rundir.BEST_POLICY} with --config" if run_dir.has(rundir.BEST_POLICY) else "a policy"
            raise InputError(str(source), f"no {rundir.BEST_MODEL} in this run directory (export {why} instead)")
        run_config = load_config(config if config is not None else run_dir / rundir.CONFIG)
        plugins = plugins or load_plugins(block=[*run_config.plugins.get("block", ()), *block])
        model, _ = load_compressed(best, plugins.techniques)
        data = load_data(run_config)
    else:
        if config is None:
            raise InputError("--config", f"needed with a policy file ({source}): the config names the model and data")
        run_config = load_config(config)
        policy = Policy.load(source)
        plugins = plugins or load_plugins(block=[*run_config.plugins.get("block", ()), *block])
        data, _, model = compress_policy(run_config, policy, plugins, source=str(source), log=log)
    val = data.val.head(check_images)
    calibration = data.train.images[: max(1, min(run_config.data.calibration_size, len(data.train)))]
    return export_model(model, format, out, val.images, labels=val.labels, calibration=calibration,
                        plugins=plugins, threads=run_config.target.threads, int8_weights=int8_weights, log=log)


def export_model(model: nn.Module, format: str, out: str | Path, images: torch.Tensor,
                 labels: torch.Tensor | None = None, calibration: torch.Tensor | None = None,
                 plugins: "Plugins | None" = None, threads: int | None = None, int8_weights: str = "auto",
                 log: Callable[[str], None] = print) -> ExportResult:
    """Export ``model`` (a compressed model, left untouched) and check the file on ``images`` against it.

    ``calibration``: images for the activation scales of int8 layers (default ``images``). ``int8_weights``: see
    :func:`int8_weight_type`.
    """
    from autocompress.pluginmanager import load_plugins

    out = check_target(format, out)
    weights, why = int8_weight_type(int8_weights)
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="autocompress-export-") as stage:
        onnx_path = Path(stage) / "model.onnx"
        plan = build_onnx(model, format, plugins or load_plugins(), images[:2],
                          images if calibration is None else calibration, onnx_path, int8_weights=weights)
        if plan.int8_layers:
            log(f"int8 weights: {why}")
        staged = [onnx_path]
        run = _run_onnx
        if format == "openvino":
            staged = _to_openvino(onnx_path, Path(stage) / "model.xml")
            run = _run_openvino
        reference = logits(model, images, batch_size=256)
        exported = run(staged[0], images, threads)
        check = _compare(reference, exported, labels, int8=bool(plan.int8_layers))
        log(check.summary("ONNX Runtime" if format == "onnx" else "OpenVINO"))
        if not check.passed:
            raise InputError("export check", check.summary(format))
        files = _publish(staged, out)
    log(f"wrote {', '.join(str(f) for f in files)}")
    return ExportResult(format, out, tuple(files), tuple(plan.int8_layers), check, plan.int8_weights)


def int8_weight_type(choice: str = "auto", flags: Iterable[str] | None = None) -> tuple[str, str]:
    """``("s8" | "u8", why)`` for the int8 layers of a QDQ file: ``choice`` itself, or with ``auto`` the type this
    CPU runs fast and exactly (``flags``: the CPU's, default this machine's; see the module docstring)."""
    if choice not in INT8_WEIGHTS:
        raise InputError("--int8-weights", f"unknown int8 weight type {choice!r} (known: {', '.join(INT8_WEIGHTS)})")
    if choice != "auto":
        return choice, f"{choice} (asked for)"
    if flags is None:
        from autocompress.cpu import cpu_info

        flags = cpu_info().flags
    vnni = [f for f in VNNI_FLAGS if f in set(flags)]
    if vnni:
        return "s8", f"s8 (this CPU has {vnni[0]}: its u8 x s8 int8 kernels are exact and fastest)"
    return "u8", ("u8 (no VNNI on this CPU: u8 x s8 kernels would saturate int16 sums; an s8 file runs 2-3x faster "
                  "on a CPU with VNNI, export it there)")


def check_target(format: str, out: str | Path) -> Path:
    """Fail before any work on an unknown format, a missing runtime or an output name the format cannot use."""
    if format not in FORMATS:
        raise InputError("--format", f"unknown format {format!r} (known: {', '.join(FORMATS)})")
    modules, extra = REQUIRES[format]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError("--format", f"{format} export needs {', '.join(missing)}: pip install 'autocompress[{extra}]'")
    out = Path(out)
    if out.is_dir():
        raise InputError("--out", f"{out} is a directory; give a file name")
    if format == "openvino" and out.suffix != ".xml":
        raise InputError("--out", f"an OpenVINO IR is a .xml file (its weights go to a .bin beside it), got {out.name}")
    return out


def prepare_for_export(model: nn.Module, target: str, plugins: "Plugins") -> tuple[nn.Module, ExportPlan]:
    """A copy of ``model`` every plugin has made exportable for ``target``, and their plan for it.

    Each plugin's ``autocompress_prepare_export`` runs on its own, so a failure names the plugin; a refused layer
    raises :class:`InputError` naming the layer.
    """
    prepared = copy.deepcopy(model).eval()
    plan = ExportPlan(target)
    arguments = {"model": prepared, "plan": plan}
    for impl in plugins.manager.hook.autocompress_prepare_export.get_hookimpls():
        try:
            impl.function(**{name: arguments[name] for name in impl.argnames})
        except Exception as exc:
            raise AutocompressError(f"plugin {impl.plugin_name!r} failed in autocompress_prepare_export: "
                                    f"{' '.join(f'{type(exc).__name__}: {exc}'.split())}") from exc
    if plan.refused:
        layer, reason = plan.refused[0]
        raise InputError(layer, reason)
    modules = dict(prepared.named_modules())
    for layer in plan.int8_layers:
        if not isinstance(modules.get(layer), nn.Linear):
            raise AutocompressError(f"{layer}: declared int8 for export but is not a Linear of the prepared model")
    return prepared, plan


def build_onnx(model: nn.Module, target: str, plugins: "Plugins", example: torch.Tensor,
               calibration: torch.Tensor, path: Path, int8_weights: str = "auto") -> ExportPlan:
    """Write ``model`` (left untouched) as the ONNX file ``path`` for ``target`` (``"onnx"`` or ``"openvino"``):
    prepared by every plugin, traced on ``example``, its declared int8 layers in QDQ with activation scales from
    ``calibration`` and weights of the type :func:`int8_weight_type` picks. What ``export_model`` publishes and
    what the ONNX Runtime and OpenVINO runtimes time."""
    weights, _ = int8_weight_type(int8_weights)
    prepared, plan = prepare_for_export(model, target, plugins)
    _to_onnx(prepared, example, path)
    if plan.int8_layers:
        _quantize_int8(path, prepared, plan.int8_layers, calibration, weights)
        plan.int8_weights = weights
    return plan


def _to_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice and tracer remarks
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InputError("--format", f"the compressed model cannot be exported to ONNX "
                             f"({type(exc).__name__}: {first})") from None


def _fingerprint(array) -> tuple:
    return array.shape, hashlib.sha1(array.tobytes()).hexdigest()


def _int8_nodes(graph, prepared: nn.Module, layers: list[str]) -> dict[str, str]:
    """layer -> the MatMul/Gemm node that multiplies by its weight, found by the weight's bytes (in either
    orientation: the exporter stores a MatMul's weight transposed), so it does not depend on the exporter's names."""
    from onnx import numpy_helper

    wanted: dict[tuple, str] = {}
    for layer in layers:
        weight = prepared.get_submodule(layer).weight.detach().float()
        for w in (weight, weight.t()):
            wanted[_fingerprint(w.contiguous().numpy())] = layer
    initializers = {init.name: init for init in graph.initializer}
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in initializers:
            layer = wanted.get(_fingerprint(numpy_helper.to_array(initializers[node.input[1]])))
            if layer is not None:
                found[layer] = node.name
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise AutocompressError(f"{missing[0]}: its MatMul was not found in the exported graph, cannot make it int8")
    return found


def _quantize_int8(path: Path, prepared: nn.Module, layers: list[str], calibration: torch.Tensor,
                   weights: str = "u8") -> None:
    """Rewrite ``path`` with the MatMul/Gemm of ``layers`` in QDQ int8 (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    nodes = _int8_nodes(onnx.load(str(path)).graph, prepared, layers)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(_batches(calibration, 64))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch.numpy()}

    quantized = path.with_name("int8.onnx")
    with _quiet_root_logger():  # ORT logs a pre-processing suggestion on every call
        quantize_static(str(path), str(quantized), Batches(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=sorted(nodes.values()),
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if weights == "s8" else QuantType.QUInt8,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    graph = onnx.load(str(quantized)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    by_name = {node.name: node for node in graph.node}
    for layer, name in nodes.items():
        node = by_name.get(name)
        if node is None or node.input[1] not in dequantized:
            raise AutocompressError(f"{layer}: ONNX Runtime's quantizer left its {name} in float; cannot make it int8")
    quantized.replace(path)


class _quiet_root_logger:
    def __enter__(self) -> None:
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        logging.root.setLevel(self.level)


def _to_openvino(onnx_path: Path, xml: Path) -> list[Path]:
    import openvino as ov

    # read_model is OpenVINO's ONNX frontend alone: 0.1 s here where convert_model took 2-6 s for the same IR
    # (the runtime applies its own graph transformations when it compiles the model either way)
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]


def _batches(images: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), size):
        yield images[start : start + size].contiguous()


def _run_onnx(path: Path, images: torch.Tensor, threads: int) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run(None, {INPUT: b.numpy()})[0]) for b in _batches(images, 256)])


def _run_openvino(xml: Path, images: torch.Tensor, threads: int) -> torch.Tensor:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
    output = compiled.output(0)
    return torch.cat([torch.from_numpy(compiled(b.numpy())[output].copy()) for b in _batches(images, 256)])


def _compare(reference: torch.Tensor, exported: torch.Tensor, labels: torch.Tensor | None, int8: bool) -> ExportCheck:
    if exported.shape != reference.shape:
        raise AutocompressError(f"the exported model's output is {tuple(exported.shape)}, torch's {tuple(reference.shape)}")
    same = (exported.argmax(-1) == reference.argmax(-1)).float().mean()
    accuracy = (lambda out: float((out.argmax(-1) == labels).float().mean())) if labels is not None else None
    return ExportCheck(
        images=len(reference), max_abs_error=float((exported - reference).abs().max()),
        output_scale=float(reference.abs().max()), agreement=float(same), int8=int8,
        accuracy_torch=None if accuracy is None else accuracy(reference),
        accuracy_exported=None if accuracy is None else accuracy(exported),
    )


def _publish(staged: list[Path], out: Path) -> list[Path]:
    """Put the checked files at ``out`` (``.bin`` before ``.xml``: a reader who sees the IR sees its weights)."""
    targets = [out if f.suffix in (".onnx", ".xml") else out.with_suffix(f.suffix) for f in staged]
    for source, target in sorted(zip(staged, targets), key=lambda pair: pair[0].suffix != ".bin"):
        try:
            atomic_write(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
        except OSError as exc:
            raise InputError("--out", f"cannot write {target} ({exc.strerror or exc})") from None
    return targets
