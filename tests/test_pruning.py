"""Structured pruning: heads and MLP channels are physically removed, timm's own forward still runs, and it is faster.

Checked on several differently shaped timm ViT-family models (depth, width, heads, class token vs. average
pooling, distillation token, qk-norm and layer scale), the DeiT-S architecture for speed, and a briefly trained tiny
ViT on real Fashion-MNIST for the data-driven criterion.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from autocompress.compose import apply_policy, check_policy, load_compressed, save_compressed, without_void
from autocompress.errors import InputError, TechniqueError
from autocompress.evaluate import accuracy
from autocompress.policy import Policy
from autocompress.space import SearchSpace
from autocompress.technique import ApplyContext, Stage, TechniqueSettings
from autocompress.testing import ModelSpec, SpeedupClaim, TechniqueContract
from autocompress_pruning import PruningTechnique, head_counts, kept_count, mlp_widths

from conftest import TINY_VIT

REPO = Path(__file__).resolve().parent.parent
PRUNING = PruningTechnique()

#: three differently shaped ViT-family models, random weights
MODELS = (
    ModelSpec("vit-cls-d2-w48-h2", "vit_tiny_patch16_224", dict(TINY_VIT)),
    # layer scale at 0.5, not timm's usual 1e-4, so that the output checks see what every block computes
    ModelSpec("vit-avgpool-noclass-qknorm-ls-d3-w64-h4", "vit_tiny_patch16_224",
              dict(img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0,
                   class_token=False, global_pool="avg", qk_norm=True, init_values=0.5)),
    ModelSpec("deit-distilled-d4-w72-h6", "deit_tiny_distilled_patch16_224",
              dict(img_size=32, patch_size=8, num_classes=5, embed_dim=72, depth=4, num_heads=6)),
)
DEIT_S = ModelSpec("deit-small", "deit_small_patch16_224", {}, batch=1)


def _half_heads_half_mlp(model: nn.Module) -> TechniqueSettings:
    return TechniqueSettings({b: {"heads": 0.5, "mlp": 0.5} for b in PRUNING.candidate_layers(model)})


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _calibration(images: torch.Tensor, batch: int = 16):
    return lambda: (images[i : i + batch] for i in range(0, len(images), batch))


def _kill_units(model: nn.Module, seed: int) -> dict[str, tuple[list[int], list[int]]]:
    """Zero every weight of some heads and MLP channels per block; returns the live ones ``(heads, channels)``."""
    gen = torch.Generator().manual_seed(seed)
    live = {}
    with torch.no_grad():
        for name, block in model.named_modules():
            if name not in PRUNING.candidate_layers(model):
                continue
            attn, mlp = block.attn, block.mlp
            h, d = attn.num_heads, attn.head_dim
            dead_heads = torch.randperm(h, generator=gen)[: h // 2].tolist()
            for head in dead_heads:
                for part in range(3):
                    rows = slice(part * h * d + head * d, part * h * d + (head + 1) * d)
                    attn.qkv.weight[rows] = 0
                    if attn.qkv.bias is not None:
                        attn.qkv.bias[rows] = 0
                attn.proj.weight[:, head * d : (head + 1) * d] = 0
            width = mlp.fc1.out_features
            dead_channels = torch.randperm(width, generator=gen)[: width * 3 // 4]
            mlp.fc1.weight[dead_channels] = 0
            mlp.fc1.bias[dead_channels] = 0
            mlp.fc2.weight[:, dead_channels] = 0
            live[name] = (sorted(set(range(h)) - set(dead_heads)), sorted(set(range(width)) - set(dead_channels.tolist())))
    return live


# --- the contract every technique plugin meets ----------------------------------------------------------------------


class TestPruningContract(TechniqueContract):
    technique = PRUNING
    plugin = "pruning"
    space = {
        # 0: the whole branch removed
        "layers": [{"match": "re:blocks\\.\\d+", "heads": [1.0, 0.5, 0.0], "mlp": [1.0, 0.5, 0.25, 0.0]}],
        "options": {"criterion": ["l1", "l2", "taylor", "random"]},
    }
    random_policies = 2
    # DeiT-S architecture (random weights), batch 1: half the heads and half the MLP width in every block measured
    # about 2x faster here; claim > 1.25x (interleaved A/B timing, robust to the shared machine's load)
    speedups = (SpeedupClaim("deit-s-half-heads-half-mlp", DEIT_S, _half_heads_half_mlp, batch=1, min_speedup=1.25,
                             repeats=5),)

    def garbage_values(self, knob, dimension):
        return [*super().garbage_values(knob, dimension), *(
            [-0.5, 1.5, 2, True, 1e-3] if knob in ("heads", "mlp") else ["L1", "magnitude"]  # 0 removes the branch
        )]


# --- exactness ------------------------------------------------------------------------------------------------------


def test_is_a_structure_stage_technique_on_every_block(plugins) -> None:
    tech = plugins.techniques["pruning"]
    assert isinstance(tech, PruningTechnique) and tech.stage is Stage.STRUCTURE
    model = MODELS[2].create()
    assert tech.candidate_layers(model) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert tech.layer_knobs == {"heads": 1.0, "mlp": 1.0} and tech.global_knobs == {"criterion": "l1"}


def _assert_keeping_everything_is_exact(model: nn.Module, x: torch.Tensor) -> None:
    """Fraction 1.0 everywhere, scored by weights and by data: the same outputs, bit for bit, and the same shapes."""
    for criterion in ("l1", "taylor"):
        settings = TechniqueSettings({b: {"heads": 1.0, "mlp": 1.0} for b in PRUNING.candidate_layers(model)},
                                     {"criterion": criterion})
        kept = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext(calibration=_calibration(x)))
        assert torch.equal(_out(kept, x), _out(model, x))
        assert _params(kept) == _params(model)


@pytest.mark.parametrize("spec", MODELS, ids=[m.id for m in MODELS])
def test_keeping_everything_reproduces_the_outputs_exactly(spec: ModelSpec) -> None:
    model = spec.create()
    _assert_keeping_everything_is_exact(model, spec.images(2))


@pytest.mark.parametrize("spec", MODELS, ids=[m.id for m in MODELS])
def test_removing_dead_units_keeps_outputs_and_counts_are_exact(spec: ModelSpec) -> None:
    """Heads and channels whose weights are all zero contribute nothing: removing exactly those (they have the
    lowest L1) must leave the outputs unchanged, which also proves the right rows and columns were cut."""
    model = spec.create()
    live = _kill_units(model, seed=1)
    blocks = PRUNING.candidate_layers(model)
    b0 = model.get_submodule(blocks[0])
    heads, head_dim, width, dim = b0.attn.num_heads, b0.attn.head_dim, b0.mlp.fc1.out_features, b0.attn.qkv.in_features
    keep_heads, keep_width = len(live[blocks[0]][0]), len(live[blocks[0]][1])
    settings = TechniqueSettings({b: {"heads": keep_heads / heads, "mlp": keep_width / width} for b in blocks})
    pruned = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext())

    assert head_counts(pruned) == {b: keep_heads for b in blocks}
    assert mlp_widths(pruned) == {b: keep_width for b in blocks}
    for b in blocks:
        attn = pruned.get_submodule(b).attn
        assert attn.attn_dim == keep_heads * head_dim and attn.head_dim == head_dim
        assert attn.scale == head_dim ** -0.5
        assert tuple(attn.qkv.weight.shape) == (3 * keep_heads * head_dim, dim)
        assert tuple(attn.proj.weight.shape) == (dim, keep_heads * head_dim)
        original = model.get_submodule(b)
        proj_cols = torch.cat([original.attn.proj.weight[:, h * head_dim : (h + 1) * head_dim] for h in live[b][0]], 1)
        assert torch.equal(attn.proj.weight, proj_cols), "the live heads were not the ones kept"
        assert torch.equal(pruned.get_submodule(b).mlp.fc1.weight, original.mlp.fc1.weight[live[b][1]])
    removed_heads, removed_channels = heads - keep_heads, width - keep_width
    per_block = removed_heads * head_dim * (4 * dim + 3) + removed_channels * (2 * dim + 1)  # qkv+bias, proj; fc1+bias, fc2
    assert _params(pruned) == _params(model) - len(blocks) * per_block

    x = spec.images(3)
    for fused in (True, False):  # timm's SDPA path and its explicit softmax path
        for m in (model, pruned):
            for module in m.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = fused
        torch.testing.assert_close(_out(pruned, x), _out(model, x), atol=1e-5, rtol=1e-5)


def test_fractions_round_to_the_nearest_count() -> None:
    assert [kept_count(3, f) for f in (1.0, 0.67, 0.5, 0.34, 0.17)] == [3, 2, 2, 1, 1]
    assert [kept_count(6, f) for f in (0.84, 0.67, 0.5, 0.34, 0.17)] == [5, 4, 3, 2, 1]
    assert [kept_count(384, f) for f in (0.75, 0.5, 0.25)] == [288, 192, 96]


def test_the_vit_space_file_offers_sensible_choices_for_the_demo_vit() -> None:
    raw = yaml.safe_load((REPO / "search_spaces" / "vit.yaml").read_text())["techniques"]["pruning"]
    demo = yaml.safe_load((REPO / "examples" / "fashion_mnist.yaml").read_text())["model"]
    model = ModelSpec("demo", demo["name"], demo["kwargs"]).create()
    space = SearchSpace.from_dict({"techniques": {"pruning": raw}}, source="vit.yaml").resolve(model, {"pruning": PRUNING})
    dims = {d.name: d for d in space.dimensions}
    assert len(dims) == 6 * 2 + 1
    heads = {kept_count(3, v) for v in dims["blocks.5:pruning.heads"].choices}
    widths = {kept_count(384, v) for v in dims["blocks.0:pruning.mlp"].choices}
    # 48: MLP 0.125; 0: the branch removed (without it the space's floor was ~0.5x on fast-GEMM CPUs)
    assert heads == {3, 2, 1, 0} and widths == {384, 288, 192, 96, 48, 0}
    assert set(dims["pruning.criterion"].choices) == {"l1", "taylor"}


# --- bad values -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knob", "value", "reason"),
    [("heads", 1.5, "(0, 1]"), ("heads", 2, "(0, 1]"),
     ("heads", -0.5, "(0, 1]"), ("heads", True, "(0, 1]"), ("heads", "half", "(0, 1]"),
     ("heads", 0.2, "keeps 0 of 2 heads"), ("mlp", 0.001, "keeps 0 of 192 MLP channels"), ("mlp", 1.01, "(0, 1]")],
)
def test_impossible_values_are_rejected_naming_the_field(knob: str, value, reason: str) -> None:
    model = MODELS[0].create()
    with pytest.raises(ValueError, match=__import__("re").escape(reason)):
        PRUNING.check_value(model, "blocks.1", knob, value)
    policy = Policy({"pruning": TechniqueSettings({"blocks.1": {knob: value}})})
    with pytest.raises(InputError) as err:
        check_policy(policy, model, {"pruning": PRUNING})
    assert err.value.field == f"policy.techniques.pruning.layers.blocks.1.{knob}"


def test_unknown_criterion_and_missing_calibration_are_reported() -> None:
    model = MODELS[0].create()
    with pytest.raises(InputError, match="unknown criterion"):
        check_policy(Policy({"pruning": TechniqueSettings(options={"criterion": "magnitude"})}), model, {"pruning": PRUNING})
    policy = Policy({"pruning": TechniqueSettings({"blocks.0": {"mlp": 0.5}}, {"criterion": "taylor"})})
    with pytest.raises(TechniqueError, match="needs calibration images"):
        apply_policy(model, policy, {"pruning": PRUNING}, ApplyContext())


def test_structure_only_builds_the_same_shapes_without_touching_data() -> None:
    spec = MODELS[2]
    model = spec.create()
    settings = TechniqueSettings({"blocks.0": {"heads": 0.5}, "blocks.2": {"heads": 0.17, "mlp": 0.25},
                                  "blocks.3": {"mlp": 0.75}}, {"criterion": "taylor"})

    def no_data():
        raise AssertionError("structure_only must not read calibration data")

    skeleton = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext(structure_only=True, calibration=no_data))
    real = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext(calibration=_calibration(spec.images(32))))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(skeleton) == shapes(real)
    assert head_counts(real) == {"blocks.0": 3, "blocks.1": 6, "blocks.2": 1, "blocks.3": 6}
    assert mlp_widths(real)["blocks.2"] == 72 and mlp_widths(real)["blocks.3"] == 216


# --- composition, save and load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("later", ["quantization", "lowrank+quantization"])
def test_pruned_then_compressed_model_saves_and_loads_back_to_the_same_outputs(plugins, tmp_path: Path, later: str) -> None:
    if "lowrank" in later and "lowrank" not in plugins.techniques:
        pytest.skip("the lowrank plugin is not installed")
    spec = MODELS[2]
    model = spec.create()
    x = spec.images(4)
    techniques = {
        "pruning": TechniqueSettings({"blocks.0": {"heads": 0.5, "mlp": 0.5}, "blocks.1": {"heads": 0.34},
                                      "blocks.3": {"mlp": 0.25}}, {"criterion": "taylor"}),
        "quantization": TechniqueSettings({"blocks.0.attn.qkv": {"format": "int8_dynamic"},
                                           "blocks.1.attn.proj": {"format": "bf16"},
                                           "blocks.3.mlp.fc2": {"format": "int8_dynamic"}}),
    }
    if "lowrank" in later:  # factorize layers pruning already shrank, then quantize the factors of one of them
        techniques["lowrank"] = TechniqueSettings({"blocks.0.mlp.fc1": {"rank": 0.25}, "blocks.3.mlp.fc2": {"rank": 0.25}})
    policy = Policy(techniques, model=spec.name)
    check_policy(policy, model, plugins.techniques)
    ctx = ApplyContext(calibration=_calibration(spec.images(32, seed=5)))
    compressed = apply_policy(model, policy, plugins.techniques, ctx)
    assert head_counts(compressed) == {"blocks.0": 3, "blocks.1": 2, "blocks.2": 6, "blocks.3": 6}

    path = tmp_path / "pruned.pt"
    save_compressed(path, compressed, Policy.from_yaml(policy.to_yaml()), spec.name, dict(spec.kwargs))
    loaded, loaded_policy = load_compressed(path, plugins.techniques)
    assert loaded_policy.to_dict() == policy.to_dict()
    assert head_counts(loaded) == head_counts(compressed) and mlp_widths(loaded) == mlp_widths(compressed)
    torch.testing.assert_close(_out(loaded, x), _out(compressed, x), atol=1e-6, rtol=1e-6)


# --- speed ---------------------------------------------------------------------------------------------------------
# The measured speedup on the DeiT-S architecture is the contract's SpeedupClaim above (TestPruningContract).


def test_half_pruned_deit_small_has_exact_heads_and_about_half_the_block_weights() -> None:
    model = DEIT_S.create()
    pruned = PRUNING.apply(copy.deepcopy(model), _half_heads_half_mlp(model), ApplyContext(structure_only=True))
    blocks = PRUNING.candidate_layers(model)
    assert head_counts(pruned) == {b: 3 for b in blocks} and mlp_widths(pruned) == {b: 768 for b in blocks}
    per_block = 3 * 64 * (4 * 384 + 3) + 768 * (2 * 384 + 1)
    assert _params(pruned) == _params(model) - 12 * per_block


# --- the data-driven criterion on real data -------------------------------------------------------------------------


def test_taylor_criterion_keeps_more_accuracy_than_random_choice(trained_tiny, fmnist) -> None:
    model, _ = trained_tiny
    blocks = PRUNING.candidate_layers(model)
    keep = {b: {"mlp": 0.25} for b in blocks}  # 48 of 192 hidden channels per block

    def pruned(criterion: str, seed: int = 0) -> nn.Module:
        ctx = ApplyContext(seed=seed, calibration=_calibration(fmnist.train.images[:256], 64))
        return PRUNING.apply(copy.deepcopy(model), TechniqueSettings(keep, {"criterion": criterion}), ctx)

    taylor, l1 = pruned("taylor"), pruned("l1")
    assert any(not torch.equal(taylor.get_submodule(b).mlp.fc1.weight, l1.get_submodule(b).mlp.fc1.weight)
               for b in blocks), "the data-driven criterion chose exactly what weight magnitude chose"
    val = fmnist.val
    random_acc = [accuracy(pruned("random", seed), val) for seed in range(3)]
    taylor_acc = accuracy(taylor, val)
    assert taylor_acc > max(random_acc) + 0.01, f"taylor {taylor_acc:.3f} vs random {random_acc}"
    assert taylor_acc > accuracy(model, val) - 0.15


# --- BEiT and EVA-02 attention, SwiGLU and GluMlp ----------------------------------------------------------------------

_SMALL = dict(num_classes=10, embed_dim=48, depth=2, num_heads=3, head_init_scale=1.0)  # head_init_scale: see DEFAULT_MODELS
# layer scale 0.5: every block shows in the output; MLP ratio 8/3: the same hidden width (128) as EVA-02's SwiGLU
_BEIT = dict(img_size=32, patch_size=8, init_values=0.5, mlp_ratio=4 * 2 / 3, **_SMALL)
_EVA = dict(img_size=28, patch_size=7, **_SMALL)
#: each kind of attention and MLP the surgery knows beyond timm's standard ones; none has a norm over the pruned
#: width (a LayerNorm over fewer channels changes the kept ones), so removing dead units must keep outputs exactly
FAMILIES = (
    ModelSpec("beit-relpos-mlp", "beit_base_patch16_224", dict(_BEIT)),
    ModelSpec("beit-shared-relpos-swiglu", "beit_base_patch16_224",
              dict(_BEIT, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, swiglu_mlp=True)),
    ModelSpec("eva02-fused-qkv-glumlp", "eva02_tiny_patch14_224", dict(_EVA)),
    ModelSpec("eva02-separate-qkv-swiglu", "eva02_tiny_patch14_224", dict(_EVA, qkv_fused=False, swiglu_align_to=8)),
)
#: EVA-02 with the sub-LN norms over the attention and the SwiGLU hidden width
EVA_NORMS = ModelSpec("eva02-subln-swiglu-norm", "eva02_tiny_patch14_224",
                      dict(_EVA, qkv_fused=False, scale_attn_inner=True, scale_mlp=True))
ALL_FAMILIES = (*FAMILIES, EVA_NORMS)


def _randomize_head_vectors(model: nn.Module) -> None:
    """timm starts q/k/v biases and relative position tables at zero: random ones show whether each head's slice
    of them was kept (k_bias is a zero buffer in real models; random here, so its slicing is checked too)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("q_bias", "k_bias", "v_bias", "relative_position_bias_table", "_proj.bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)


def _set_fused_attn(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def _features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model.forward_features(x), model(x)


def _assert_alike_on_both_attention_paths(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """Features and logits of ``model`` match ``reference``'s on timm's SDPA path and its explicit softmax path."""
    for fused in (True, False):
        _set_fused_attn(model, fused)
        _set_fused_attn(reference, fused)
        for a, b in zip(_features_and_logits(model, x), _features_and_logits(reference, x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _zero_units(block: nn.Module, heads: list[int], channels: list[int]) -> None:
    """Zero what the given heads and channels put out and every weight that scores them, leaving their biases: the
    output cannot depend on them, and they have the lowest L1 scores."""
    attn, mlp = block.attn, block.mlp
    h, width = attn.num_heads, mlp.fc2.in_features
    d = attn.proj.in_features // h
    with torch.no_grad():
        for head in heads:
            cols = slice(head * d, (head + 1) * d)
            attn.proj.weight[:, cols] = 0
            if getattr(attn, "qkv", None) is not None:
                for part in range(3):
                    attn.qkv.weight[part * h * d + head * d : part * h * d + (head + 1) * d] = 0
            else:
                for p in (attn.q_proj, attn.k_proj, attn.v_proj):
                    p.weight[cols] = 0
        for c in channels:
            mlp.fc2.weight[:, c] = 0
            for name in ("fc1", "fc1_g", "fc1_x"):
                fc = getattr(mlp, name, None)
                if fc is not None:
                    fc.weight[c :: width] = 0  # GluMlp: the channel's row in both halves of fc1


@pytest.mark.parametrize("spec", ALL_FAMILIES, ids=[m.id for m in ALL_FAMILIES])
def test_beit_and_eva_blocks_are_candidates_and_keeping_everything_is_exact(spec: ModelSpec) -> None:
    model = spec.create()
    _randomize_head_vectors(model)
    assert PRUNING.candidate_layers(model) == ["blocks.0", "blocks.1"]
    assert head_counts(model) == {"blocks.0": 3, "blocks.1": 3}
    _assert_keeping_everything_is_exact(model, spec.images(2))


@pytest.mark.parametrize("spec", FAMILIES, ids=[m.id for m in FAMILIES])
def test_pruned_beit_and_eva_forward_is_timms_computation(spec: ModelSpec) -> None:
    """The pruned classes' forward (it reshapes by the kept heads' width, not the input's) computes exactly what
    timm's does: keeping every head swaps the class and must not change a bit, on SDPA and the explicit path."""
    from autocompress_pruning.surgery import PrunedBeitAttention, PrunedEvaAttention, prune_heads

    model = spec.create()
    _randomize_head_vectors(model)
    swapped = copy.deepcopy(model)
    for block in swapped.blocks:
        prune_heads(block.attn, range(block.attn.num_heads))
        assert type(block.attn) in (PrunedBeitAttention, PrunedEvaAttention)
    x = spec.images(2)
    for fused in (True, False):
        _set_fused_attn(model, fused)
        _set_fused_attn(swapped, fused)
        for a, b in zip(_features_and_logits(swapped, x), _features_and_logits(model, x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("spec", FAMILIES, ids=[m.id for m in FAMILIES])
def test_removing_dead_beit_and_eva_units_keeps_outputs(spec: ModelSpec) -> None:
    """Heads whose output projection is zero and channels whose fc2 column is zero contribute nothing; removing
    exactly them (lowest L1) keeps features and logits, which fails if any kept head lost its own q/k/v bias
    slice or relative position bias column, or if GluMlp's gate and value halves went out of step."""
    model = spec.create()
    _randomize_head_vectors(model)
    dead_heads = {"blocks.0": [0], "blocks.1": [1]}  # not the last head: a slip to the first k heads would show
    width = model.blocks[0].mlp.fc2.in_features
    dead_channels = {b: list(range(i, width, 3)) for i, b in enumerate(dead_heads)}
    for b in dead_heads:
        _zero_units(model.get_submodule(b), dead_heads[b], dead_channels[b])
    keep_width = width - len(dead_channels["blocks.0"])
    assert keep_width == width - len(dead_channels["blocks.1"])
    settings = TechniqueSettings({b: {"heads": 0.67, "mlp": keep_width / width} for b in dead_heads})
    pruned = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext())
    assert head_counts(pruned) == {b: 2 for b in dead_heads}
    assert mlp_widths(pruned) == {b: keep_width for b in dead_heads}
    for b, dead in dead_heads.items():
        attn, original = pruned.get_submodule(b).attn, model.get_submodule(b).attn
        d = original.proj.in_features // 3
        live = [h for h in range(3) if h not in dead]
        expected = torch.cat([original.proj.weight[:, h * d : (h + 1) * d] for h in live], 1)
        assert torch.equal(attn.proj.weight, expected), "the live heads were not the ones kept"
        if hasattr(attn, "head_index"):
            assert attn.head_index.tolist() == live
    _assert_alike_on_both_attention_paths(pruned, model, spec.images(3))


def _expected_shapes(spec: ModelSpec, heads: int, width: int) -> dict[str, tuple[int, ...]]:
    """Every parameter a head or a channel owns, at ``heads`` heads of 16 and ``width`` hidden channels."""
    dim, a = 48, heads * 16
    shapes = {"attn.proj.weight": (dim, a)}
    kwargs = spec.kwargs
    if spec.name.startswith("beit"):
        shapes.update({"attn.qkv.weight": (3 * a, dim), "attn.q_bias": (a,), "attn.v_bias": (a,)})
        if kwargs.get("use_rel_pos_bias", True):
            shapes["attn.relative_position_bias_table"] = ((2 * 4 - 1) ** 2 + 3, heads)
    elif kwargs.get("qkv_fused", True):
        shapes.update({"attn.qkv.weight": (3 * a, dim), "attn.q_bias": (a,), "attn.v_bias": (a,)})
    else:
        shapes.update({f"attn.{p}_proj.weight": (a, dim) for p in "qkv"})
        shapes.update({"attn.q_proj.bias": (a,), "attn.v_proj.bias": (a,)})
    if kwargs.get("scale_attn_inner"):
        shapes.update({"attn.norm.weight": (a,), "attn.norm.bias": (a,)})
    glu = spec.name.startswith("eva") and not (kwargs.get("scale_mlp") or kwargs.get("swiglu_align_to"))
    if glu:
        shapes.update({"mlp.fc1.weight": (2 * width, dim), "mlp.fc1.bias": (2 * width,)})
    elif spec.name.startswith("eva") or kwargs.get("swiglu_mlp"):
        shapes.update({f"mlp.{fc}.{t}": (width, dim) if t == "weight" else (width,)
                       for fc in ("fc1_g", "fc1_x") for t in ("weight", "bias")})
    else:
        shapes.update({"mlp.fc1.weight": (width, dim), "mlp.fc1.bias": (width,)})
    shapes["mlp.fc2.weight"] = (dim, width)
    if kwargs.get("scale_mlp"):
        shapes.update({"mlp.norm.weight": (width,), "mlp.norm.bias": (width,)})
    return shapes


@pytest.mark.parametrize("spec", ALL_FAMILIES, ids=[m.id for m in ALL_FAMILIES])
@pytest.mark.parametrize("criterion", ["l1", "l2", "random", "taylor"])
def test_beit_and_eva_pruning_gives_exact_counts_with_every_criterion(spec: ModelSpec, criterion: str) -> None:
    model = spec.create()
    _randomize_head_vectors(model)
    blocks = PRUNING.candidate_layers(model)
    width = model.blocks[0].mlp.fc2.in_features
    assert width == 128  # 48 * 8/3
    before = {b: {k: tuple(v.shape) for k, v in model.get_submodule(b).state_dict().items()} for b in blocks}
    assert all(before[b][k] == v for b in blocks for k, v in _expected_shapes(spec, 3, 128).items())
    x = spec.images(4)
    settings = TechniqueSettings({"blocks.0": {"heads": 0.34, "mlp": 0.25}, "blocks.1": {"heads": 0.67}},
                                 {"criterion": criterion})
    pruned = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext(seed=3, calibration=_calibration(x, 2)))
    assert head_counts(pruned) == {"blocks.0": 1, "blocks.1": 2}
    assert mlp_widths(pruned) == {"blocks.0": 32, "blocks.1": 128}
    for b, (heads, channels) in {"blocks.0": (1, 32), "blocks.1": (2, 128)}.items():
        state = pruned.get_submodule(b).state_dict()
        assert pruned.get_submodule(b).attn.num_heads == heads
        for key, shape in _expected_shapes(spec, heads, channels).items():
            assert tuple(state[key].shape) == shape, f"{b}.{key}"
    out = _out(pruned, x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_beit_pruned_heads_survive_save_and_load_with_a_shared_relative_position_bias(plugins, tmp_path: Path) -> None:
    """Which heads a BEiT block kept picks its slices of the model-level shared bias: a rebuilt model (kept heads
    0..k-1 before the weights load) must get them back from the saved ``head_index``."""
    spec = FAMILIES[1]
    model = spec.create()
    _randomize_head_vectors(model)
    for b in ("blocks.0", "blocks.1"):
        _zero_units(model.get_submodule(b), [0], [])
    policy = Policy({"pruning": TechniqueSettings({"blocks.0": {"heads": 0.67}, "blocks.1": {"heads": 0.67}})},
                    model=spec.name)
    compressed = apply_policy(model, policy, plugins.techniques, ApplyContext())
    path = tmp_path / "beit.pt"
    save_compressed(path, compressed, policy, spec.name, dict(spec.kwargs))
    loaded, _ = load_compressed(path, plugins.techniques)
    assert loaded.blocks[0].attn.head_index.tolist() == [1, 2]
    x = spec.images(2)
    torch.testing.assert_close(_out(loaded, x), _out(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("later", ["quantization", "quantization-bf16-compute", "lowrank+quantization"])
def test_pruned_beit_and_eva_then_compressed_keep_their_counts(plugins, later: str) -> None:
    """Low rank and quantization replace the pruned Linears (BEiT/EVA then call qkv instead of reading its weight;
    with bf16 compute every fp32 Linear is wrapped too); the counts still read the pruned sizes and the model
    runs."""
    if "lowrank" in later and "lowrank" not in plugins.techniques:
        pytest.skip("the lowrank plugin is not installed")
    for spec in (FAMILIES[0], FAMILIES[2]):
        model = spec.create()
        techniques = {
            "pruning": TechniqueSettings({"blocks.0": {"heads": 0.67, "mlp": 0.5}, "blocks.1": {"heads": 0.34}}),
            "quantization": TechniqueSettings({"blocks.0.attn.qkv": {"format": "int8_dynamic"},
                                               "blocks.0.mlp.fc2": {"format": "bf16"},
                                               "blocks.1.attn.qkv": {"format": "int4_weight"}},
                                              {"compute": "bf16" if "bf16" in later else "fp32"}),
        }
        if "lowrank" in later:
            techniques["lowrank"] = TechniqueSettings({"blocks.0.attn.qkv": {"rank": 0.25},
                                                       "blocks.1.mlp.fc1": {"rank": 0.25}},
                                                      {"method": "activation_aware"})
        x = spec.images(4)
        compressed = apply_policy(model, Policy(techniques, model=spec.name), plugins.techniques,
                                  ApplyContext(calibration=_calibration(x)))
        assert head_counts(compressed) == {"blocks.0": 2, "blocks.1": 1}
        assert mlp_widths(compressed) == {"blocks.0": 64, "blocks.1": 128}
        out = _out(compressed, x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_an_unsupported_attention_is_refused_by_name_while_its_mlp_still_prunes() -> None:
    """timm's AttentionRope may get a different rotary embedding per head (rope_mixed), which a per-block surgery
    cannot slice: it is not supported, and the reason names it."""
    spec = ModelSpec("vit-rope-mixed", "vit_small_patch16_rope_mixed_224",
                     dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=2, num_heads=3))
    model = spec.create()
    assert PRUNING.candidate_layers(model) == ["blocks.0", "blocks.1"]
    with pytest.raises(ValueError, match="attention is AttentionRope"):
        PRUNING.check_value(model, "blocks.0", "heads", 0.67)
    pruned = PRUNING.apply(copy.deepcopy(model), TechniqueSettings({"blocks.0": {"mlp": 0.5}}), ApplyContext())
    assert mlp_widths(pruned)["blocks.0"] == 96 and head_counts(pruned) == {}
    assert torch.isfinite(_out(pruned, spec.images(2))).all()


@pytest.mark.parametrize("spec", FAMILIES[::2], ids=[m.id for m in FAMILIES[::2]])
def test_the_vit_space_file_prunes_every_beit_and_eva_block(plugins, spec: ModelSpec) -> None:
    model = spec.create()
    space = SearchSpace.load("vit").resolve(model, plugins.techniques)
    pruning = {d.name for d in space.dimensions if d.technique == "pruning"}
    assert pruning == {f"blocks.{i}:pruning.{k}" for i in range(2) for k in ("heads", "mlp")} | {"pruning.criterion"}


# --- removing a whole branch (0 heads / 0 MLP channels) ---------------------------------------------------------------


@pytest.mark.parametrize("spec", (*MODELS, *FAMILIES), ids=[m.id for m in (*MODELS, *FAMILIES)])
def test_removing_every_head_or_channel_is_the_branch_with_its_output_weights_zeroed(spec: ModelSpec) -> None:
    """With every head pruned, what the attention adds is its ``proj`` bias (likewise ``fc2``'s for the MLP): the
    model with ``heads: 0`` on one block and ``mlp: 0`` on another computes exactly what the original computes with
    those output weights zeroed, on SDPA and the explicit path. Fails if the norm, the layer scale or the bias is
    dropped, or the wrong branch goes."""
    from autocompress_pruning.surgery import RemovedBranch

    model = spec.create()
    _randomize_head_vectors(model)
    with torch.no_grad():
        for block in model.blocks:  # timm starts biases at zero: random ones show that they are kept
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.bias.normal_(0.0, 0.5)
    blocks = PRUNING.candidate_layers(model)
    settings = TechniqueSettings({blocks[0]: {"heads": 0.0}, blocks[-1]: {"mlp": 0, "heads": 0.5}})
    removed = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext())
    assert isinstance(removed.get_submodule(blocks[0]).attn, RemovedBranch)
    assert isinstance(removed.get_submodule(blocks[-1]).mlp, RemovedBranch)
    assert isinstance(removed.get_submodule(blocks[0]).norm1, nn.Identity)
    assert not isinstance(removed.get_submodule(blocks[0]).norm2, nn.Identity)  # the MLP's norm stays
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.get_submodule(blocks[0]).attn.proj.weight.zero_()
        reference.get_submodule(blocks[-1]).mlp.fc2.weight.zero_()
    reference = PRUNING.apply(reference, TechniqueSettings({blocks[-1]: {"heads": 0.5}}), ApplyContext())
    _assert_alike_on_both_attention_paths(removed, reference, spec.images(2))
    b0 = model.get_submodule(blocks[0])
    gone = sum(p.numel() for m in (b0.attn, b0.norm1) for p in m.parameters()) - b0.attn.proj.bias.numel()
    assert _params(removed) < _params(model) - gone + 1  # the branch's weights are gone, its bias stays


def test_a_post_norm_block_refuses_removal_by_name_but_still_prunes_heads() -> None:
    """ResPostBlock normalizes the branch's output, not its input: its attention cannot become a constant bias."""
    spec = ModelSpec("vit-res-post", "vit_tiny_patch16_224",
                     dict(TINY_VIT, block_fn=__import__("timm").models.vision_transformer.ResPostBlock))
    model = spec.create()
    with pytest.raises(ValueError, match="pre-norm block .* not ResPostBlock"):
        PRUNING.check_value(model, "blocks.0", "heads", 0.0)
    PRUNING.check_value(model, "blocks.0", "heads", 0.5)


def test_settings_for_layers_a_removed_branch_took_with_it_are_dropped_not_failed(plugins) -> None:
    """Quantizing or factorizing the Linears of an attention that pruning removed has nothing left to act on: the
    policy applies (those layers' settings are void), while a layer the model never had is still refused."""
    spec = MODELS[0]
    model = spec.create()
    policy = Policy({"pruning": TechniqueSettings({"blocks.0": {"heads": 0.0}}),
                     "quantization": TechniqueSettings({"blocks.0.attn.qkv": {"format": "int8_dynamic"},
                                                        "blocks.1.attn.qkv": {"format": "int8_dynamic"}}),
                     "lowrank": TechniqueSettings({"blocks.0.attn.proj": {"rank": 0.25}})})
    compressed = apply_policy(model, policy, plugins.techniques, ApplyContext())
    assert type(compressed.blocks[1].attn.qkv).__name__ == "DynamicInt8Linear"
    assert torch.isfinite(_out(compressed, spec.images(2))).all()
    wrong = Policy({"quantization": TechniqueSettings({"blocks.9.attn.qkv": {"format": "int8_dynamic"}})})
    with pytest.raises((InputError, TechniqueError)):
        apply_policy(model, wrong, plugins.techniques, ApplyContext())


def test_the_policy_a_run_saves_leaves_out_the_settings_a_removed_branch_made_void(plugins) -> None:
    """What :func:`without_void` keeps is what was applied: the void settings are gone, the rest is untouched, and
    applied again it builds the same model."""
    spec = MODELS[0]
    model = spec.create()
    policy = Policy({"pruning": TechniqueSettings({"blocks.0": {"heads": 0.0}, "blocks.1": {"mlp": 0.5}}),
                     "quantization": TechniqueSettings({"blocks.0.attn.qkv": {"format": "int8_dynamic"},
                                                        "blocks.1.attn.qkv": {"format": "int8_dynamic"}}),
                     "lowrank": TechniqueSettings({"blocks.0.attn.proj": {"rank": 0.25}}),
                     "distillation": TechniqueSettings(options={"steps": 0})})
    compressed = apply_policy(model, policy, plugins.techniques, ApplyContext())
    kept = without_void(policy, model, compressed)
    assert kept.techniques["pruning"].layers == policy.techniques["pruning"].layers
    assert kept.techniques["quantization"].layers == {"blocks.1.attn.qkv": {"format": "int8_dynamic"}}
    assert "lowrank" not in kept.techniques, "its only layer went with the attention"
    assert kept.techniques["distillation"].options == {"steps": 0}
    assert "blocks.0.attn.qkv" in policy.techniques["quantization"].layers, "the policy given is not changed"
    again = apply_policy(model, kept, plugins.techniques, ApplyContext())
    assert [(n, type(m).__name__) for n, m in again.named_modules()] == \
        [(n, type(m).__name__) for n, m in compressed.named_modules()]
    torch.testing.assert_close(_out(again, spec.images(2)), _out(compressed, spec.images(2)))
