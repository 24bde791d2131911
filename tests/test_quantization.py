"""The quantization plugin: per-layer formats with real kernels, simulated k-bit weights marked as such."""

import pytest
import torch

from autocompress.compose import apply_policy, load_compressed, save_compressed, simulated_layers
from autocompress.costs import compare_latency
from autocompress.cpu import bf16_gemm_speedup
from autocompress.policy import Policy
from autocompress_quantization.modules import (
    Bf16Linear, DynamicInt8Linear, PackedIntWeightLinear, pack_bits, unpack_bits,
)
from conftest import TINY_VIT, make_tiny_vit

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _all_blocks(model, fmt, compute=None):
    params = {f"blocks.{b}.{l}:quantization.format": fmt for b in range(len(model.blocks)) for l in BLOCK_LINEARS}
    if compute:
        params["quantization.compute"] = compute
    return Policy.from_params(params)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_is_lossless_and_takes_bits_per_value(bits):
    values = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(values, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values.to(torch.int32))


@pytest.mark.parametrize("fmt, cls, tol", [
    ("bf16", Bf16Linear, 0.05), ("int8_dynamic", DynamicInt8Linear, 0.05),
    ("int8_weight", PackedIntWeightLinear, 0.02), ("int4_weight", PackedIntWeightLinear, 0.3),
])
def test_each_format_replaces_the_layer_and_stays_close(plugins, fmt, cls, tol):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128)
    model = torch.nn.Sequential(lin)
    policy = Policy.from_params({"0:quantization.format": fmt})
    q = apply_policy(model, policy, plugins.techniques)
    assert isinstance(q[0], cls)
    x = torch.randn(32, 64)
    with torch.inference_mode():
        err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < tol, (fmt, float(err))


def test_fewer_bits_mean_larger_error(plugins):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 96))
    x = torch.randn(64, 96)
    errors = []
    for bits in (8, 6, 4, 3, 2):
        q = apply_policy(model, Policy.from_params({"0:quantization.format": f"int{bits}_weight"}), plugins.techniques)
        with torch.inference_mode():
            errors.append(float((q(x) - model(x)).pow(2).mean()))
    assert errors == sorted(errors)


def test_simulated_formats_are_reported_and_real_ones_are_not(plugins):
    policy = Policy.from_params({
        "blocks.0.attn.qkv:quantization.format": "int4_weight",
        "blocks.0.mlp.fc1:quantization.format": "int8_dynamic",
        "blocks.1.mlp.fc2:quantization.format": "bf16",
    })
    assert simulated_layers(policy, plugins.techniques) == ["blocks.0.attn.qkv:quantization"]


def test_bf16_activations_keep_the_model_fp32_in_and_out_and_close(plugins):
    model = make_tiny_vit()
    q = apply_policy(model, _all_blocks(model, "bf16", compute="bf16"), plugins.techniques)
    assert q.blocks[0].norm1.weight.dtype == torch.bfloat16
    assert q.head.inner.weight.dtype == torch.float32  # the head stayed at fp32, wrapped
    x = torch.randn(16, 1, 28, 28)
    with torch.inference_mode():
        out, ref = q(x), model(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("fmt, compute", [("int8_dynamic", None), ("int4_weight", None), ("bf16", "bf16")])
def test_quantized_models_save_and_load_with_identical_outputs(plugins, tmp_path, fmt, compute):
    model = make_tiny_vit()
    policy = _all_blocks(model, fmt, compute)
    q = apply_policy(model, policy, plugins.techniques)
    save_compressed(tmp_path / "q.pt", q, policy, "vit_tiny_patch16_224", TINY_VIT)
    loaded, _ = load_compressed(tmp_path / "q.pt", plugins.techniques)
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.speed
def test_simulated_4bit_is_not_faster_and_bf16_everywhere_follows_this_cpus_bf16_kernels(plugins):
    """What the search relies on: a simulated format claims no speed; bf16 compute is a real speedup where this
    CPU's bf16 GEMM is faster than fp32 (AVX-512 bf16, AMX), and a real slowdown where it is emulated (AVX2)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=4).eval()
    variants = {
        "fp32": model,
        "int4": apply_policy(model, _all_blocks(model, "int4_weight"), plugins.techniques),
        "bf16": apply_policy(model, _all_blocks(model, "bf16", compute="bf16"), plugins.techniques),
    }
    lat = compare_latency(variants, torch.randn(4, 3, 224, 224), threads=2, warmup=2, repeats=7)
    assert lat["int4"].median_ms > 0.85 * lat["fp32"].median_ms
    gemm = bf16_gemm_speedup()  # measured here first: the model's speed must follow the kernels' direction
    if gemm >= 1.25:
        assert lat["bf16"].median_ms < 0.9 * lat["fp32"].median_ms, (gemm, lat)
    elif gemm <= 0.5:
        assert lat["bf16"].median_ms > 1.1 * lat["fp32"].median_ms, (gemm, lat)
