"""Policies are plain data keyed by module names: YAML round trip, trial parameters, re-application."""

import pytest
import torch

from autocompress.compose import apply_policy, check_policy, load_compressed, save_compressed
from autocompress.errors import InputError
from autocompress.policy import Policy, param_name, parse_param_name
from autocompress.space import SearchSpace
from autocompress.technique import TechniqueSettings
from conftest import TINY_VIT, make_tiny_vit

POLICY_YAML = """
model: vit_tiny_patch16_224
techniques:
  quantization:
    layers:
      blocks.0.attn.qkv: {format: bf16}
      blocks.1.mlp.fc1: {format: int8_dynamic}
      blocks.1.mlp.fc2: {format: int4_weight}
"""


def test_param_names_are_stable_and_parse_back():
    assert param_name("quantization", "format", "blocks.3.attn.qkv") == "blocks.3.attn.qkv:quantization.format"
    assert parse_param_name("blocks.3.attn.qkv:quantization.format") == ("quantization", "format", "blocks.3.attn.qkv")
    assert parse_param_name("distillation.steps") == ("distillation", "steps", None)


def test_yaml_round_trip_is_exact():
    policy = Policy.from_yaml(POLICY_YAML)
    again = Policy.from_yaml(policy.to_yaml())
    assert again == policy
    assert again.techniques["quantization"].layers["blocks.1.mlp.fc2"] == {"format": "int4_weight"}


def test_params_round_trip_drops_identities():
    policy = Policy.from_yaml(POLICY_YAML)
    params = policy.to_params()
    params["blocks.0.attn.proj:quantization.format"] = "fp32"  # identity: leaves the layer as it is
    back = Policy.from_params(params, identities={"blocks.0.attn.proj:quantization.format": "fp32"},
                              model=policy.model)
    assert back == policy


def test_reapplying_a_policy_gives_the_same_model(plugins):
    model = make_tiny_vit()
    policy = Policy.from_yaml(POLICY_YAML)
    check_policy(policy, model, plugins.techniques)
    x = torch.randn(8, 1, 28, 28)
    a = apply_policy(model, policy, plugins.techniques)
    b = apply_policy(model, Policy.from_yaml(policy.to_yaml()), plugins.techniques)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
        # the input model is untouched
        assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)


def test_saved_compressed_model_loads_back_with_the_same_outputs(plugins, tmp_path):
    model = make_tiny_vit()
    policy = Policy.from_yaml(POLICY_YAML)
    compressed = apply_policy(model, policy, plugins.techniques)
    path = tmp_path / "small.pt"
    save_compressed(path, compressed, policy, "vit_tiny_patch16_224", TINY_VIT)
    loaded, loaded_policy = load_compressed(path, plugins.techniques)
    assert loaded_policy == policy
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), compressed(x))


@pytest.mark.parametrize(
    "text, field",
    [
        ("techniques: {quantization: {layers: {blocks.9.attn.qkv: {format: bf16}}}}", "blocks.9.attn.qkv"),
        ("techniques: {quantization: {layers: {blocks.0.attn.qkv: {format: fp7}}}}", "format"),
        ("techniques: {magic: {options: {x: 1}}}", "policy.techniques.magic"),
        ("techniques: {quantization: {layerz: {}}}", "layerz"),
    ],
)
def test_a_policy_that_does_not_fit_names_the_field(plugins, text, field):
    with pytest.raises(InputError) as exc:
        check_policy(Policy.from_yaml(text), make_tiny_vit(), plugins.techniques)
    assert field in str(exc.value)


def test_space_resolves_to_stable_dimensions_with_identity_first(plugins):
    space = SearchSpace.load("vit").resolve(make_tiny_vit(), plugins.techniques)
    quant = [d for d in space.dimensions if d.technique == "quantization" and d.layer is not None]
    assert [d.choices for d in space.dimensions if d.name == "quantization.compute"] == [("fp32", "bf16")]
    assert [d.name for d in quant][:2] == ["blocks.0.attn.qkv:quantization.format", "blocks.0.attn.proj:quantization.format"]
    assert len(quant) == 2 * 4 + 1  # 2 blocks x (qkv, proj, fc1, fc2) + head
    assert all(d.choices[0] == "fp32" for d in quant)
    uniform = space.uniform_baselines()
    assert "uniform quantization.format=bf16" in uniform
    assert set(uniform["uniform quantization.format=bf16"][d.name] for d in quant) == {"bf16"}
    # int8_dynamic is not offered for the head: the uniform policy sets it wherever it is offered
    int8 = uniform["uniform quantization.format=int8_dynamic"]
    assert int8["head:quantization.format"] == "fp32"
    assert {int8[d.name] for d in quant if d.layer != "head"} == {"int8_dynamic"}
    # the space file's named baseline: bf16 weights and bf16 activations
    assert uniform["bf16 everywhere"]["quantization.compute"] == "bf16"


def test_composed_baselines_chain_the_cheapest_measured_values_toward_the_budget(plugins):
    space = SearchSpace.load("vit").resolve(make_tiny_vit(), plugins.techniques)
    uniform = space.uniform_baselines()
    costs = {label: 100.0 for label in uniform} | {"uncompressed": 100.0}
    costs |= {
        "bf16 everywhere": 50.0,  # the cheapest of all: the chain starts from it, per-layer formats included
        "uniform quantization.format=int8_dynamic": 60.0,  # format is set by the start: not added again
        "uniform pruning.mlp=0.25": 70.0, "uniform pruning.mlp=0.5": 75.0,  # most effective addition: first
        "uniform lowrank.rank=0.5": 90.0, "uniform lowrank.rank=0.25": float("nan"),  # not measured: not chosen
        "uniform pruning.heads=0.34": 120.0, "uniform pruning.heads=0.67": 130.0,  # slower than uncompressed
    }
    chain = space.composed_baselines(costs, limit=20.0)  # 0.5 x 0.7 x 0.9 = 0.315: never within 0.8 x 0.2
    assert list(chain) == ["composed: bf16 everywhere + pruning.mlp=0.25",
                           "composed: bf16 everywhere + pruning.mlp=0.25 + lowrank.rank=0.5"]
    params = chain["composed: bf16 everywhere + pruning.mlp=0.25 + lowrank.rank=0.5"]

    def values(knob: str) -> set:
        return {params[d.name] for d in space.dimensions if d.knob == knob and d.layer != "head"}

    assert values("format") == {"bf16"} and params["quantization.compute"] == "bf16"
    assert values("mlp") == {0.25} and values("heads") == {1.0}
    rank = [d for d in space.dimensions if d.knob == "rank"]
    assert all(params[d.name] == (0.5 if 0.5 in d.choices else d.identity) for d in rank), "where it is offered"
    assert all(params[d.name] == d.identity for d in space.dimensions if d.technique == "distillation")
    # a looser budget: the chain steps until the estimate is within 0.8 x the limit (0.5 x 0.7 <= 0.8 x 0.45),
    # then one last policy takes every remaining knob (the estimate is optimistic)
    looser = space.composed_baselines(costs, limit=45.0)
    assert list(looser) == ["composed: bf16 everywhere + pruning.mlp=0.25",
                            "composed: bf16 everywhere + pruning.mlp=0.25 + all the others"]
    assert looser["composed: bf16 everywhere + pruning.mlp=0.25 + all the others"] == params
    # the cheapest baseline alone is within budget: nothing to compose
    assert space.composed_baselines(costs, limit=90.0) == {}
    # nothing beat the uncompressed model: nothing to compose
    assert space.composed_baselines({label: 100.0 for label in [*uniform, "uncompressed"]}, limit=20.0) == {}


def test_space_pattern_matching_nothing_is_an_error(plugins):
    space = SearchSpace.from_dict({"techniques": {"quantization": {"layers": [{"match": "blocks.*.nope", "format": ["bf16"]}]}}})
    with pytest.raises(InputError, match=r"layers\[0\]\.match.*matches no layer"):
        space.resolve(make_tiny_vit(), plugins.techniques)


class _OwnAttention(torch.nn.Module):
    """A user's own attention module: the builtin pruning does not know its forward, so it cannot remove heads."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, *args, **kwargs):
        return self.inner(x, *args, **kwargs)


def test_the_default_space_leaves_out_what_a_technique_cannot_do_on_this_model_and_says_why(plugins):
    """The builtin 'vit' space on a model whose first block has an attention kind pruning does not know: that
    block's heads are left out (one line for the technique, naming layer and reason), the rest is searched."""
    model = make_tiny_vit(depth=3)
    model.blocks[0].attn = _OwnAttention(model.blocks[0].attn)
    space = SearchSpace.load("vit")
    resolved = space.resolve(model, plugins.techniques)
    names = {d.name for d in resolved.dimensions}
    assert "blocks.0:pruning.heads" not in names
    assert {"blocks.0:pruning.mlp", "blocks.1:pruning.heads", "blocks.2:pruning.heads"} <= names
    line = resolved.left_out["pruning"]
    assert line.startswith("pruning: left out of the search for this model: heads: ") and "blocks.0" in line
    assert "_OwnAttention" in line and "blocks.1" not in line
    assert set(resolved.left_out) == {"pruning"}
    # a technique that is not installed is left out of a builtin space too, and said
    without_lowrank = {k: v for k, v in plugins.techniques.items() if k != "lowrank"}
    assert "lowrank: not installed" in space.resolve(model, without_lowrank).left_out["lowrank"]

    # the same rules in a user's own space file are held to the letter: the one-line error names the rule
    own = SearchSpace.from_dict({"techniques": {"pruning": space.techniques["pruning"]}}, source="my_space.yaml")
    with pytest.raises(InputError, match=r"my_space\.yaml\.techniques\.pruning\.layers\[0\]\.heads: 0\.67 cannot be "
                                         r"applied for blocks\.0: .*_OwnAttention"):
        own.resolve(model, plugins.techniques)
