"""The low-rank plugin: real factorized layers (two smaller nn.Linear), exact costs, activation-aware factors that
beat plain SVD on real data, policies that round-trip and models that save and load, measured faster on DeiT-S."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import yaml
from torch import nn

import autocompress
from autocompress.compose import apply_policy, check_policy, load_compressed, save_compressed
from autocompress.costs import compare_latency, weight_bytes
from autocompress.errors import InputError, TechniqueError
from autocompress.policy import Policy
from autocompress.space import SearchSpace
from autocompress.technique import ApplyContext, TechniqueSettings
from autocompress.testing import TechniqueContract
from autocompress_lowrank import LowRankLinear, LowRankTechnique, factorize_layer, svd_factors, whitened_factors
from autocompress_lowrank.factorize import input_second_moments

from conftest import TINY_VIT, make_tiny_vit

BLOCK_LAYERS = [f"blocks.{b}.{n}" for b in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def lowrank_policy(layers: dict[str, float | int], method: str = "svd", **others: TechniqueSettings) -> Policy:
    settings = TechniqueSettings(layers={k: {"rank": v} for k, v in layers.items()}, options={"method": method})
    return Policy(techniques={"lowrank": settings, **others}, model="vit_tiny_patch16_224")


def calibration_of(images: torch.Tensor, batch: int = 64):
    return lambda: iter(images.split(batch))


def trained_copy(trained_tiny) -> nn.Module:
    model, _ = trained_tiny
    return model.eval()


def output_error(w: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """Mean squared output error ``E||(W - W') x||^2`` over inputs with second moment ``moment``."""
    diff = (w - approx).double()
    return torch.trace(diff @ moment.double() @ diff.T).item()


# --- plugin and candidates ----------------------------------------------------------------------------------------


def test_lowrank_is_loaded_through_the_entry_point_group(plugins):
    technique = plugins.techniques["lowrank"]
    assert plugins.owners["lowrank"] == "lowrank"
    assert technique.stage == autocompress.Stage.FACTORIZATION
    assert technique.layer_knobs == {"rank": 1.0} and technique.global_knobs == {"method": "svd"}


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", TINY_VIT),
    ("deit_tiny_distilled_patch16_224", TINY_VIT),
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=2)),
])
def test_full_rank_factors_reproduce_every_block_linear_of_vit_family_models(plugins, name, kwargs):
    """EVA reads ``attn.qkv.weight`` itself (separate q/v biases): the plugin must make it call the module."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    layers = plugins.techniques["lowrank"].candidate_layers(model)
    depth = kwargs["depth"]
    assert layers == [f"blocks.{b}.{n}" for b in range(depth) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        for layer in layers:
            linear = model.get_submodule(layer)
            factorize_layer(model, layer, min(linear.in_features, linear.out_features), svd_factors(linear.weight))
        got = model(x)
    assert all(isinstance(model.get_submodule(layer), LowRankLinear) for layer in layers)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class TestLowRankContract(TechniqueContract):
    """The third-party plugin contract, on several ViT shapes, with the lowrank entry of search_spaces/vit.yaml."""

    technique = LowRankTechnique()
    plugin = "lowrank"
    space = SearchSpace.load("vit").techniques["lowrank"]
    atol = 1e-5


# --- the factorization itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96, 288), (288, 96), (64, 64)])
def test_full_rank_reproduces_the_layer_outputs_for_both_methods(shape):
    torch.manual_seed(0)
    in_f, out_f = shape
    linear = nn.Linear(in_f, out_f)
    x = torch.randn(512, in_f) * torch.linspace(0.05, 3.0, in_f)  # anisotropic inputs, like a ViT's
    moment = x.T @ x / x.shape[0]
    full = min(in_f, out_f)
    for factors in (svd_factors(linear.weight), whitened_factors(linear.weight, moment)):
        up, down = factors.truncate(full)
        layer = LowRankLinear.from_factors(up, down, linear.bias.detach())
        assert isinstance(layer.down, nn.Linear) and isinstance(layer.up, nn.Linear)
        assert layer.down.weight.shape == (full, in_f) and layer.up.weight.shape == (out_f, full)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_reconstruction_error_falls_as_rank_grows(trained_tiny, fmnist):
    """On a trained layer and real activations: weight error for SVD, output error for the activation-aware
    factors, both monotone in rank and zero at full rank."""
    model = trained_copy(trained_tiny)
    layer = "blocks.1.mlp.fc1"
    linear = model.get_submodule(layer)
    moment = input_second_moments(model, [layer], fmnist.train.images[:256].split(64))[layer]
    w = linear.weight.detach()
    plain, aware = svd_factors(w), whitened_factors(w, moment)
    ranks = list(range(1, plain.full_rank + 1))
    weight_err = [torch.linalg.matrix_norm(w - torch.mm(*plain.truncate(r))).item() for r in ranks]
    output_err = [output_error(w, torch.mm(*aware.truncate(r)), moment) for r in ranks]
    for errors in (weight_err, output_err):
        assert all(b <= a * (1 + 1e-5) + 1e-7 for a, b in zip(errors, errors[1:])), errors
        assert errors[0] > 100 * max(errors[-1], 1e-6)
    assert weight_err[-1] < 1e-4 * weight_err[0]


def test_activation_aware_beats_plain_svd_on_held_out_real_data(plugins, trained_tiny, fmnist):
    """Same ranks, same layers: whitening by the real inputs' second moment gives each layer's outputs and the
    model's logits much closer to the dense model's on validation images it never saw."""
    model = trained_copy(trained_tiny)
    ranks = {layer: 0.25 for layer in BLOCK_LAYERS}
    ctx = ApplyContext(calibration=calibration_of(fmnist.train.images[:256]))
    plain = apply_policy(model, lowrank_policy(ranks, "svd"), plugins.techniques, ctx)
    aware = apply_policy(model, lowrank_policy(ranks, "activation_aware"), plugins.techniques, ctx)
    val = fmnist.val.images[:500]
    held_out = input_second_moments(model, BLOCK_LAYERS, val.split(100))
    for layer in BLOCK_LAYERS:
        w = model.get_submodule(layer).weight.detach()
        errors = [output_error(w, m.get_submodule(layer).up.weight @ m.get_submodule(layer).down.weight, held_out[layer])
                  for m in (plain, aware)]
        assert errors[1] < 0.5 * errors[0], (layer, errors)
    with torch.no_grad():
        dense_out, plain_out, aware_out = model(val), plain(val), aware(val)
    plain_err = (plain_out - dense_out).pow(2).mean().item()
    aware_err = (aware_out - dense_out).pow(2).mean().item()
    assert aware_err < 0.5 * plain_err, (aware_err, plain_err)


def test_activation_aware_without_calibration_fails_with_a_reason(plugins):
    model = make_tiny_vit()
    with pytest.raises(TechniqueError, match="calibration"):
        apply_policy(model, lowrank_policy({"blocks.0.mlp.fc1": 0.25}, "activation_aware"), plugins.techniques)


def test_factors_are_cached_per_model_and_reused_across_ranks(plugins, fmnist):
    model = make_tiny_vit()
    cache: dict = {}
    ctx = ApplyContext(calibration=calibration_of(fmnist.train.images[:128]), cache=cache)
    first = apply_policy(model, lowrank_policy({"blocks.0.mlp.fc1": 0.5}, "activation_aware"), plugins.techniques, ctx)
    (entry,) = cache["lowrank.factors"].values()
    cached = entry["blocks.0.mlp.fc1"]
    second = apply_policy(model, lowrank_policy({"blocks.0.mlp.fc1": 0.25}, "activation_aware"), plugins.techniques, ctx)
    assert entry["blocks.0.mlp.fc1"] is cached and len(cache["lowrank.factors"]) == 1
    # a 0.25 factorization is the leading slice of the 0.5 one
    torch.testing.assert_close(second.blocks[0].mlp.fc1.up.weight, first.blocks[0].mlp.fc1.up.weight[:, :12])


def test_svd_factors_are_cached_per_layer_weight_not_per_model(plugins):
    """A plain SVD needs nothing but the layer's weight: changing another layer (what each trial's pruning or
    another block's training does) keeps the factors; changing the layer's own weight computes new ones."""
    model = make_tiny_vit()
    cache: dict = {}
    ctx = ApplyContext(cache=cache)
    first = apply_policy(model, lowrank_policy({"blocks.0.mlp.fc1": 0.5}), plugins.techniques, ctx)
    (key, cached), = cache["lowrank.svd"].items()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.mul_(2.0)  # another layer
    second = apply_policy(model, lowrank_policy({"blocks.0.mlp.fc1": 0.25}), plugins.techniques, ctx)
    assert list(cache["lowrank.svd"].items()) == [(key, cached)]
    torch.testing.assert_close(second.blocks[0].mlp.fc1.up.weight, first.blocks[0].mlp.fc1.up.weight[:, :12])
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(2.0)  # the layer itself
    third = apply_policy(model, lowrank_policy({"blocks.0.mlp.fc1": 0.25}), plugins.techniques, ctx)
    assert len(cache["lowrank.svd"]) == 2 and cache["lowrank.svd"][key] is cached
    torch.testing.assert_close(third.blocks[0].mlp.fc1.up.weight @ third.blocks[0].mlp.fc1.down.weight,
                               2 * (second.blocks[0].mlp.fc1.up.weight @ second.blocks[0].mlp.fc1.down.weight))


# --- checks and costs ---------------------------------------------------------------------------------------------


def test_ranks_that_do_not_reduce_cost_or_make_no_sense_are_rejected(plugins):
    technique = plugins.techniques["lowrank"]
    model = make_tiny_vit()  # dim 48: qkv 48->144 (break-even 36), proj 48->48 (break-even 24)
    technique.check_value(model, "blocks.0.attn.qkv", "rank", 0.5)  # 24 < 36
    technique.check_value(model, "blocks.0.attn.qkv", "rank", 35)
    technique.check_value(model, "blocks.0.attn.proj", "rank", 1.0)  # identity: always allowed
    for layer, value in [("blocks.0.attn.proj", 0.5), ("blocks.0.attn.qkv", 36), ("blocks.0.attn.qkv", 0.75),
                         ("blocks.0.attn.qkv", 1000)]:
        with pytest.raises(ValueError, match="does not reduce"):
            technique.check_value(model, layer, "rank", value)
    for value in [0.0, -0.5, 1.5, 0, -3, True, "half", None, 48.0]:
        with pytest.raises(ValueError):
            technique.check_value(model, "blocks.0.mlp.fc1", "rank", value)
    with pytest.raises(ValueError, match="method"):
        technique.check_value(model, None, "method", "qr")
    with pytest.raises(InputError) as err:
        check_policy(lowrank_policy({"blocks.0.attn.proj": 0.5}), model, plugins.techniques)
    assert err.value.field == "policy.techniques.lowrank.layers.blocks.0.attn.proj.rank"
    with pytest.raises(InputError) as err:
        SearchSpace.from_dict({"techniques": {"lowrank": {"layers": [{"match": "blocks.*.attn.proj", "rank": [0.5]}]}}},
                              source="space").resolve(model, plugins.techniques)
    assert err.value.field == "space.techniques.lowrank.layers[0].rank"


def test_parameter_and_byte_counts_are_exact(plugins):
    """Dense in*out(+out) becomes r*in + out*r (+out); bf16 halves every factor; int8 stores int8 factors plus one
    fp32 scale per output row of each factor."""
    model = make_tiny_vit()
    ranks = {"blocks.0.attn.qkv": 0.5, "blocks.0.attn.proj": 0.25, "blocks.1.mlp.fc1": 10, "blocks.1.mlp.fc2": 0.25}
    dense_params = sum(p.numel() for p in model.parameters())
    dense_bytes = weight_bytes(model)
    expected_ranks = {"blocks.0.attn.qkv": 24, "blocks.0.attn.proj": 12, "blocks.1.mlp.fc1": 10, "blocks.1.mlp.fc2": 12}
    small = apply_policy(model, lowrank_policy(ranks), plugins.techniques)
    removed = added = 0
    for layer, r in expected_ranks.items():
        dense, low = model.get_submodule(layer), small.get_submodule(layer)
        assert (low.rank, low.down.weight.shape, low.up.weight.shape) == (r, (r, dense.in_features), (dense.out_features, r))
        removed += dense.in_features * dense.out_features
        added += r * (dense.in_features + dense.out_features)
    assert sum(p.numel() for p in small.parameters()) == dense_params - removed + added
    assert weight_bytes(small) == dense_bytes - 4 * (removed - added)

    for fmt in ("bf16", "int8_dynamic"):
        quant = TechniqueSettings(layers={layer: {"format": fmt} for layer in ranks})
        both = apply_policy(model, lowrank_policy(ranks, quantization=quant), plugins.techniques)
        expected = dense_bytes
        for layer, r in expected_ranks.items():
            dense = model.get_submodule(layer)
            i, o = dense.in_features, dense.out_features
            expected -= 4 * (i * o + o)
            if fmt == "bf16":
                expected += 2 * (r * i + o * r + o)
            else:  # down: int8 r x in + r scales; up: int8 out x r + out scales + fp32 bias
                expected += (r * i + 4 * r) + (o * r + 4 * o + 4 * o)
        assert weight_bytes(both) == expected, fmt


# --- policies, apply, save / load ---------------------------------------------------------------------------------


def test_policy_yaml_round_trip_and_reapplication(plugins, trained_tiny, fmnist, tmp_path):
    model = trained_copy(trained_tiny)
    space = SearchSpace.load("vit").resolve(model, plugins.techniques)
    dims = {d.name: d for d in space.dimensions if d.technique == "lowrank"}
    assert dims["lowrank.method"].choices[0] == "svd" and "activation_aware" in dims["lowrank.method"].choices
    assert dims["blocks.0.attn.qkv:lowrank.rank"].choices[0] == 1.0
    params = space.identities
    params.update({"blocks.0.attn.qkv:lowrank.rank": 0.5, "blocks.1.attn.proj:lowrank.rank": 0.25,
                   "blocks.1.mlp.fc2:lowrank.rank": 0.25, "lowrank.method": "activation_aware"})
    policy = space.policy(params, model="vit_tiny_patch16_224")
    assert set(policy.techniques) == {"lowrank"}
    path = tmp_path / "policy.yaml"
    path.write_text(policy.to_yaml())
    loaded = Policy.load(path)
    assert loaded == policy and loaded.to_params() == policy.to_params()
    assert yaml.safe_load(path.read_text())["techniques"]["lowrank"]["layers"]["blocks.0.attn.qkv"] == {"rank": 0.5}

    ctx = ApplyContext(calibration=calibration_of(fmnist.train.images[:128]))
    first = autocompress.apply(model, policy, plugins, ctx)
    again = autocompress.apply(model, str(path), plugins, ctx)
    x = fmnist.val.images[:32]
    with torch.no_grad():
        assert torch.equal(first(x), again(x))
    assert isinstance(again.get_submodule("blocks.1.attn.proj"), LowRankLinear)
    assert isinstance(again.get_submodule("blocks.0.mlp.fc1"), nn.Linear)


@pytest.mark.parametrize("fmt", [None, "bf16", "int8_dynamic"])
def test_save_and_load_round_trip_gives_identical_outputs(plugins, trained_tiny, fmnist, tmp_path, fmt):
    model = trained_copy(trained_tiny)
    ranks = {"blocks.0.attn.qkv": 0.5, "blocks.0.attn.proj": 0.25, "blocks.1.mlp.fc1": 0.25, "blocks.1.mlp.fc2": 8}
    extra = {}
    if fmt:
        extra["quantization"] = TechniqueSettings(layers={l: {"format": fmt} for l in [*ranks, "blocks.1.attn.qkv"]})
    policy = lowrank_policy(ranks, "activation_aware", **extra)
    small = apply_policy(model, policy, plugins.techniques, ApplyContext(calibration=calibration_of(fmnist.train.images[:128])))
    path = tmp_path / "small.pt"
    save_compressed(path, small, policy, "vit_tiny_patch16_224", TINY_VIT)
    loaded, loaded_policy = load_compressed(path, plugins.techniques)
    assert loaded_policy == policy
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in small.modules()]
    x = fmnist.val.images[:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert weight_bytes(loaded) == weight_bytes(small)


def test_cli_apply_writes_a_model_that_loads_back(plugins, tiny_config, fmnist, tmp_path):
    from autocompress.cli import main
    from autocompress.config import config_from_dict
    from autocompress.runner import compress, load_data, load_model

    policy = lowrank_policy({"blocks.0.mlp.fc1": 0.25, "blocks.1.attn.qkv": 0.5}, "activation_aware")
    policy_path, config_path, out = tmp_path / "p.yaml", tmp_path / "c.yaml", tmp_path / "m.pt"
    policy_path.write_text(policy.to_yaml())
    config_path.write_text(yaml.safe_dump(tiny_config))
    assert main(["apply", str(policy_path), "--config", str(config_path), "--out", str(out), "--no-measure"]) == 0
    loaded, _ = load_compressed(out, plugins.techniques)
    config = config_from_dict(tiny_config)
    data = load_data(config)
    expected = compress(load_model(config, data), policy, plugins.techniques, config, data, seed=config.search.seed)
    x = fmnist.val.images[:32]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))


# --- measured latency -----------------------------------------------------------------------------------------------


@pytest.mark.speed
def test_rank_halved_deit_small_is_measured_faster_than_dense(plugins):
    """DeiT-S architecture (random weights: latency does not depend on values). qkv, fc1 and fc2 at half their
    full rank (proj at half rank would not save anything and is rejected, so it stays dense)."""
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    technique = plugins.techniques["lowrank"]
    layers = {l: 0.5 for l in technique.candidate_layers(dense) if not l.endswith("attn.proj")}
    assert len(layers) == 36
    policy = Policy({"lowrank": TechniqueSettings(layers={l: {"rank": r} for l, r in layers.items()})})
    check_policy(policy, dense, plugins.techniques)
    halved = apply_policy(dense, policy, plugins.techniques, ApplyContext(structure_only=True))
    assert math.isclose(sum(p.numel() for p in halved.parameters()) / sum(p.numel() for p in dense.parameters()),
                        0.68, abs_tol=0.02)
    x = torch.randn(2, 3, 224, 224)
    timings = compare_latency({"dense": dense, "halved": halved}, x, threads=2, warmup=1, repeats=5)
    assert timings["halved"].median_ms < timings["dense"].median_ms, timings
