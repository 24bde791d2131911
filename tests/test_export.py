"""`autocompress export`: a policy combining all four builtin techniques, exported to ONNX and OpenVINO IR, runs in
its runtime with the torch model's outputs; formats with no export path fail in one line and write nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from autocompress import Policy, save_compressed
from autocompress.cli import main
from autocompress.compose import apply_policy, load_compressed
from autocompress.config import config_from_dict
from autocompress.errors import InputError
from autocompress.export import export_model, int8_weight_type
from autocompress.runner import compress, load_data

from conftest import FASHION_MNIST, TINY_VIT, make_tiny_vit

ort = pytest.importorskip("onnxruntime", reason="needs autocompress[onnx]")
onnx = pytest.importorskip("onnx", reason="needs autocompress[onnx]")
ov = pytest.importorskip("openvino", reason="needs autocompress[openvino]")

ROOT = Path(__file__).resolve().parents[1]
INT8 = ("blocks.0.attn.qkv", "blocks.1.mlp.fc1", "head")

#: every builtin technique at once: block 0 pruned, block 1's fc1 factorized and then int8, qkv and head int8,
#: recovered by a few distillation steps
POLICY = {"model": "vit_tiny_patch16_224", "techniques": {
    "pruning": {"layers": {"blocks.0": {"heads": 0.5, "mlp": 0.5}}},
    "lowrank": {"layers": {"blocks.1.mlp.fc1": {"rank": 0.25}, "blocks.1.attn.proj": {"rank": 0.25}}},
    "distillation": {"options": {"steps": 10, "batch_size": 32}},
    "quantization": {"layers": {layer: {"format": "int8_dynamic"} for layer in INT8}},
}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained_tiny, plugins) -> Path:
    """A run directory as a search leaves it (config.yaml, best_policy.yaml, best_model.pt) for POLICY."""
    _, ckpt = trained_tiny
    folder = tmp_path_factory.mktemp("run")
    raw = {"model": {"name": "vit_tiny_patch16_224", "kwargs": dict(TINY_VIT), "checkpoint": str(ckpt)},
           "data": {"kind": "fashion_mnist", "path": str(FASHION_MNIST), "val_size": 1000, "train_subset": 500,
                    "calibration_size": 128},
           "target": {"threads": 1}, "out": str(folder)}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    (folder / "best_policy.yaml").write_text(yaml.safe_dump(POLICY))
    config = config_from_dict(raw, base_dir=folder)
    data = load_data(config)
    base = make_tiny_vit()
    base.load_state_dict(trained_tiny[0].state_dict())
    policy = Policy.from_dict(POLICY)
    model = compress(base, policy, plugins.techniques, config, data, seed=0)
    save_compressed(folder / "best_model.pt", model, policy, config.model.name, config.model.kwargs)
    return folder


def _val_images(run_dir: Path, n: int = 300) -> torch.Tensor:
    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), base_dir=run_dir)
    return load_data(config).val.images[-n:]  # not the images the export checked itself on


def _top1_agreement(a: np.ndarray, b: torch.Tensor) -> float:
    return float((torch.from_numpy(a).argmax(-1) == b.argmax(-1)).float().mean())


def test_run_dir_exports_to_onnx_and_openvino_with_int8_layers_and_torchs_outputs(run_dir, plugins, tmp_path, capsys):
    onnx_out, xml_out = tmp_path / "m.onnx", tmp_path / "ir" / "m.xml"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(onnx_out), "--check-images", "500"]) == 0
    assert main(["export", str(run_dir), "--format", "openvino", "--out", str(xml_out), "--check-images", "500"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime vs torch on 500 images: top-1 agreement" in printed and ": ok" in printed
    weight_type, why = int8_weight_type()  # this CPU's: s8 with VNNI, u8 without
    assert printed.count(f"int8 weights: {why}") == 2
    assert "OpenVINO vs torch on 500 images" in printed
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ir", "m.bin", "m.onnx", "m.xml"]  # no temporary files

    model, _ = load_compressed(run_dir / "best_model.pt", plugins.techniques)
    images = _val_images(run_dir)
    with torch.inference_mode():
        expected = model(images)

    graph = onnx.load(str(onnx_out))
    assert graph.opset_import[0].version >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    stored = onnx.TensorProto.INT8 if weight_type == "s8" else onnx.TensorProto.UINT8
    int8_weights = {i.name for i in graph.graph.initializer if i.data_type == stored and i.dims}
    weight_dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]
    assert len(weight_dq) == len(INT8) + 1  # the factorized fc1 is two int8 MatMuls
    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    assert _top1_agreement(session.run(None, {"images": images.numpy()})[0], expected) >= 0.99

    compiled = ov.Core().compile_model(str(xml_out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert _top1_agreement(compiled(images.numpy())[compiled.output(0)], expected) >= 0.99
    precisions = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
    assert precisions.count("u8") + precisions.count("i8") == len(INT8) + 1, precisions  # OpenVINO's own int8


def test_policy_and_config_export_and_the_python_api_returns_the_check(run_dir, tmp_path):
    import autocompress

    out = tmp_path / "policy.onnx"
    result = autocompress.export(run_dir / "best_policy.yaml", "onnx", out, config=run_dir / "config.yaml",
                                 check_images=200, int8_weights="u8", log=lambda _: None)
    assert result.path == out and result.files == (out,) and result.check.passed and result.check.images == 200
    assert len(result.int8_layers) == len(INT8) + 1
    # u8 weights, asked for: exact on every CPU (what a file built for a CPU without VNNI holds)
    assert result.int8_weights == "u8"
    types = {i.data_type for i in onnx.load(str(out)).graph.initializer if i.dims and i.data_type in
             (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) == 2}
    assert types == {onnx.TensorProto.UINT8}, types


def test_int8_weight_type_follows_the_cpu():
    """s8 weights where the CPU has VNNI (its u8 x s8 kernels accumulate in int32: 2-3x faster there), u8 without
    (AVX2's u8 x s8 kernels saturate int16 sums); an explicit choice is kept; anything else is one line."""
    for flags in (("avx2", "avx512f", "avx512_vnni"), ("avx2", "avx_vnni"), ("avx2", "avx512f", "amx_int8")):
        assert int8_weight_type("auto", flags)[0] == "s8", flags
    weights, why = int8_weight_type("auto", ("avx2", "avx512f"))
    assert weights == "u8" and "no VNNI" in why
    assert int8_weight_type("s8", ("avx2",))[0] == "s8" and int8_weight_type("u8", ("amx_int8",))[0] == "u8"
    with pytest.raises(InputError, match="--int8-weights: unknown int8 weight type 's7'"):
        int8_weight_type("s7")


@pytest.mark.parametrize("argv, field", [
    (["--format", "tflite"], "--format: unknown format 'tflite'"),
    (["--format", "openvino"], "--out: an OpenVINO IR is a .xml file"),
    (["--format", "onnx", "--int8-weights", "int4"], "--int8-weights: unknown int8 weight type 'int4'"),
])
def test_unknown_format_or_wrong_out_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, field):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err
    assert list(tmp_path.iterdir()) == []


def test_format_without_export_path_names_layer_and_format_and_writes_nothing(run_dir, tmp_path, capsys):
    policy = {"model": "vit_tiny_patch16_224", "techniques": {
        "lowrank": {"layers": {"blocks.1.mlp.fc1": {"rank": 0.25}}},
        "quantization": {"layers": {"blocks.0.mlp.fc2": {"format": "int8_dynamic"},
                                    "blocks.1.mlp.fc1": {"format": "int4_weight"}}}}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    out = tmp_path / "out" / "m.onnx"
    code = main(["export", str(path), "--config", str(run_dir / "config.yaml"), "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "blocks.1.mlp.fc1.down: format int4_weight is simulated" in err and "no onnx export" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_hook_autocompress_prepare_export(tmp_path):
    """A third-party module the exporter cannot trace is swapped by its plugin's hook; a refusal stops the export."""
    from autocompress.pluginmanager import load_plugins
    from autocompress.technique import replace_module

    class Opaque(torch.nn.Module):  # stands for a custom kernel: the tracer cannot see through .numpy()
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.inner = linear

        def forward(self, x):
            return torch.from_numpy(self.inner(x).detach().numpy().copy())

    class Plugin:
        __name__ = "opaque"
        refuse = False

        @staticmethod
        def autocompress_prepare_export(model, plan):
            for name, module in list(model.named_modules()):
                if isinstance(module, Opaque):
                    if Plugin.refuse:
                        plan.refuse(name, f"opaque has no {plan.target} export")
                    replace_module(model, name, module.inner)
                    plan.int8(name)

    model = make_tiny_vit()
    replace_module(model, "blocks.1.mlp.fc2", Opaque(model.blocks[1].mlp.fc2))
    images = torch.randn(64, 1, 28, 28)
    plugins = load_plugins(extra=[Plugin()])
    result = export_model(model, "onnx", tmp_path / "m.onnx", images, plugins=plugins, log=lambda _: None)
    assert result.int8_layers == ("blocks.1.mlp.fc2",) and isinstance(model.blocks[1].mlp.fc2, Opaque)
    Plugin.refuse = True
    with pytest.raises(InputError, match=r"^blocks\.1\.mlp\.fc2: opaque has no openvino export$"):
        export_model(model, "openvino", tmp_path / "r.xml", images, plugins=plugins)
    assert not (tmp_path / "r.xml").exists()


def test_token_merging_example_plugin_exports_with_a_dynamic_batch(tmp_path, plugins, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "tome_plugin" / "src"))
    from autocompress_tome import TokenMergingTechnique

    model = make_tiny_vit(patch_size=4, class_token=False, global_pool="avg")  # 49 tokens, merged then laid out
    policy = Policy.from_dict({"techniques": {"tome": {"layers": {"blocks.0": {"r": 8}, "blocks.1": {"r": 4}}},
                                              "pruning": {"layers": {"blocks.1": {"mlp": 0.5}}}}})
    merged = apply_policy(model, policy, {**plugins.techniques, "tome": TokenMergingTechnique()})
    images = torch.randn(37, 1, 28, 28)  # traced with 2 images: another batch size runs too
    for fmt, out in (("onnx", tmp_path / "t.onnx"), ("openvino", tmp_path / "t.xml")):
        check = export_model(merged, fmt, out, images, plugins=plugins, log=lambda _: None).check
        assert check.passed and not check.int8 and check.images == 37
    for name in [n for n in sys.modules if n.split(".")[0] == "autocompress_tome"]:
        del sys.modules[name]
