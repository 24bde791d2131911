"""Costs are measured on the realised model: memory = stored bytes, latency = median of timed runs."""

import io

import pytest
import torch

from autocompress.compose import apply_policy, save_compressed
from autocompress.costs import compare_latency, measure_latency, paired_ratio, weight_bytes
from autocompress.policy import Policy
from conftest import TINY_VIT, make_tiny_vit


def _serialized_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors in a safetensors file of the state dict, without the header."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    header = int.from_bytes(blob[:8], "little")
    return len(blob) - 8 - header


def test_memory_of_uncompressed_model_is_four_bytes_per_parameter():
    model = make_tiny_vit()
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model) == 4 * n_params + n_buffers
    assert weight_bytes(model) == _serialized_tensor_bytes(model)


def test_memory_accounting_matches_the_serialized_bytes_of_compressed_models(plugins):
    model = make_tiny_vit()
    quant_layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for fmt in ("bf16", "int8_dynamic", "int4_weight", "int2_weight"):
        policy = Policy.from_params({f"{n}:quantization.format": fmt for n in quant_layers})
        compressed = apply_policy(model, policy, plugins.techniques)
        assert weight_bytes(compressed) == _serialized_tensor_bytes(compressed), fmt
    # 4-bit weights take an eighth of fp32 for the weight matrices (plus per-channel scales)
    fc1 = model.blocks[0].mlp.fc1
    policy = Policy.from_params({"blocks.0.mlp.fc1:quantization.format": "int4_weight"})
    small = apply_policy(model, policy, plugins.techniques)
    saved = weight_bytes(model) - weight_bytes(small)
    w = fc1.weight.numel()
    assert saved == 4 * w - (w // 2 + 4 * fc1.out_features)


def test_saved_file_size_tracks_reported_memory(plugins, tmp_path):
    model = make_tiny_vit()
    policy = Policy.from_params({f"blocks.{b}.{l}:quantization.format": "int4_weight"
                                 for b in range(2) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")})
    small = apply_policy(model, policy, plugins.techniques)
    save_compressed(tmp_path / "m.pt", small, policy, "vit_tiny_patch16_224", TINY_VIT)
    size = (tmp_path / "m.pt").stat().st_size
    # torch.save adds a zip container and names; the tensor bytes dominate for real models
    assert weight_bytes(small) <= size <= weight_bytes(small) + 64 * 1024


def test_latency_is_a_median_of_repeated_timed_runs():
    model = make_tiny_vit()
    lat = measure_latency(model, torch.randn(16, 1, 28, 28), threads=1, warmup=1, repeats=7)
    assert len(lat.samples_ms) == 7
    assert lat.median_ms == sorted(lat.samples_ms)[3]
    assert lat.median_ms > 0


@pytest.mark.speed
def test_latency_measurement_sees_a_model_that_does_more_work():
    small = make_tiny_vit()
    big = make_tiny_vit(depth=8, embed_dim=192, num_heads=3)
    lat = compare_latency({"small": small, "big": big}, torch.randn(64, 1, 28, 28), threads=1, warmup=2, repeats=7)
    assert lat["big"].median_ms > 2 * lat["small"].median_ms


def test_paired_ratio_holds_when_the_machine_slows_down_halfway():
    """Two models timed a minute apart disagree when load changes in between; timed in the same rounds, their ratio
    does not. Here the 'machine' (a sleep in both forwards) gets 3x slower after a few calls."""
    import time as _time

    calls = {"n": 0}

    class Slept(torch.nn.Module):
        def __init__(self, ms: float) -> None:
            super().__init__()
            self.ms = ms

        def forward(self, x):
            calls["n"] += 1
            _time.sleep(self.ms / 1000 * (3 if calls["n"] > 12 else 1))
            return x

    x = torch.zeros(1)
    ratio = paired_ratio(Slept(10), Slept(5), x, warmup=1, repeats=9)
    assert 0.4 < ratio.median_ms < 0.6, ratio
    # the same two models, each timed on its own: the second one pays for the slowdown the first did not see
    calls["n"] = 0
    apart = measure_latency(Slept(5), x, warmup=1, repeats=9).median_ms / measure_latency(Slept(10), x, warmup=1,
                                                                                          repeats=9).median_ms
    assert not 0.4 < apart < 0.6, apart
