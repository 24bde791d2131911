"""The contract every technique plugin must meet, as a pytest class to subclass (like ``optuna.testing``).

A plugin author writes, in one of their test files::

    from autocompress.testing import TechniqueContract
    from my_plugin import MyTechnique

    class TestMyTechniqueContract(TechniqueContract):
        technique = MyTechnique()
        plugin = "mine"  # entry-point name; checks the installed plugin registers the technique
        space = {"layers": [{"match": "re:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc1", "keep": [1.0, 0.5]}]}

and pytest runs every ``test_*`` method below on several small timm ViT-family models (:data:`DEFAULT_MODELS`:
different depth, width and head count, class token, average pooling, distillation and register tokens; and BEiT
and EVA-02, which a technique may decline by offering no layer on them). ``space`` is the technique's entry of a
search-space file (``layers`` rules and ``options``), resolved against each model exactly as a search would. What
is checked is what the core and the user rely on:

- the technique declares candidate layers (real module names, in model order) and the space resolves on them;
- every offered choice applies without error and keeps the output shape and finite outputs;
- the identity setting of every knob reproduces the uncompressed outputs;
- settings round-trip through a :class:`~autocompress.policy.Policy` and its YAML, and re-apply to the same outputs;
- ``save_compressed`` / ``load_compressed`` rebuild the same model (structure-only apply + strict weight load);
- ``simulated_layers`` is honest: it names only layers the setting changes, every module that flags itself
  ``simulated = True`` lies in a reported layer, and a setting claimed to be faster (:class:`SpeedupClaim`) is not
  simulated and is measurably faster than the dense model (interleaved A/B timing);
- ``check_value`` rejects garbage with ``ValueError``;
- every choice exports to ONNX (where ``onnxruntime`` is installed) and the file gives the torch model's outputs in
  ONNX Runtime, or the export is refused with an :class:`~autocompress.errors.InputError` naming a layer and writes
  nothing (see the ``autocompress_prepare_export`` hook).

Override :meth:`TechniqueContract.space_for`, :meth:`TechniqueContract.make_context` or
:meth:`TechniqueContract.garbage_values` where a technique needs it; set ``models`` to add or replace models.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import pytest
import torch
import yaml
from torch import nn

from autocompress.compose import apply_policy, check_policy, load_compressed, save_compressed
from autocompress.costs import compare_latency
from autocompress.pluginmanager import Plugins, load_plugins
from autocompress.policy import Policy
from autocompress.space import Dimension, ResolvedSpace, SearchSpace
from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings

__all__ = ["DEFAULT_MODELS", "ModelSpec", "SpeedupClaim", "TechniqueContract"]

_YAML_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class ModelSpec:
    """A small timm model built from its architecture name and keyword arguments (random weights, seeded).

    ``optional``: a technique may decline this architecture. When a technique with per-layer knobs offers no
    candidate layer on it, the checks on it are skipped (saying so) instead of failing; a technique that does offer
    layers on it is held to every check. The plain ViT-family models are not optional.
    """

    id: str
    name: str
    kwargs: Mapping[str, Any]
    batch: int = 2
    optional: bool = False

    def create(self, seed: int = 0) -> nn.Module:
        import timm

        torch.manual_seed(seed)
        return timm.create_model(self.name, pretrained=False, **dict(self.kwargs)).eval()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.kwargs.get("img_size", 224)
        h, w = (size, size) if isinstance(size, int) else size
        return int(self.kwargs.get("in_chans", 3)), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.kwargs.get("num_classes", 1000))

    def images(self, n: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(n, *self.image_shape, generator=generator)


#: Several ViT-family shapes: the conformance suite's default models. Small enough that a full run takes seconds.
#: BEiT (relative position bias, separate q/v biases, layer scale) and EVA-02 (rotary embeddings, packed SwiGLU) are
#: optional: a technique written for plain ViT blocks may offer no layer on them.
DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("vit-cls-d2-w48-h2", "vit_tiny_patch16_224",
              dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=2)),
    ModelSpec("vit-avgpool-d3-w64-h4", "vit_tiny_patch16_224",
              dict(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=64, depth=3, num_heads=4,
                   mlp_ratio=2.0, class_token=False, global_pool="avg")),
    ModelSpec("deit-distilled-d2-w32-h2", "deit_tiny_distilled_patch16_224",
              dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)),
    ModelSpec("vit-reg-qknorm-ls-d4-w96-h3", "vit_small_patch16_224",
              dict(img_size=24, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=3,
                   reg_tokens=2, qk_norm=True, init_values=1e-4, qkv_bias=False)),
    # head_init_scale 1 instead of timm's 1e-3, so that the output checks see more than a near-zero classifier
    ModelSpec("beit-relpos-ls-d2-w48-h3", "beit_base_patch16_224",
              dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=2, num_heads=3,
                   head_init_scale=1.0), optional=True),
    ModelSpec("eva02-rope-swiglu-d2-w48-h3", "eva02_tiny_patch14_224",
              dict(img_size=28, patch_size=7, in_chans=3, num_classes=10, embed_dim=48, depth=2, num_heads=3,
                   head_init_scale=1.0), optional=True),
)


@dataclass(frozen=True)
class SpeedupClaim:
    """A setting the technique says makes ``model`` faster: it must not be simulated and must measure faster.

    ``settings`` is the technique's settings, or a function of the built model returning them. The dense and the
    compressed model are timed interleaved (A B A B ...), so machine load hits both alike; the claim holds when the
    dense median over the compressed median exceeds ``min_speedup``. Choose a model where the gap is large (>25%):
    timings on a shared machine are noisy.

    ``requires`` is for a claim that holds on some CPUs only (bf16 is faster than fp32 with AVX-512 bf16 or AMX and
    8-18x slower with AVX2 alone): a function, run before timing, that returns why the claim cannot hold on this
    machine (the test is skipped with that reason) or None. Decide it by measuring, not by CPU names: see
    :func:`autocompress.cpu.slow_bf16_reason`.
    """

    id: str
    model: ModelSpec
    settings: TechniqueSettings | Callable[[nn.Module], TechniqueSettings]
    batch: int = 8
    threads: int = 2
    min_speedup: float = 1.0
    repeats: int = 7
    requires: Callable[[], str | None] | None = None


@dataclass
class _Case:
    spec: ModelSpec
    model: nn.Module
    inputs: torch.Tensor
    dense: torch.Tensor
    space: ResolvedSpace = field(default_factory=lambda: ResolvedSpace([]))


@functools.lru_cache(maxsize=1)
def _installed_plugins() -> Plugins:
    """The plugins as a user gets them, loaded once per test session."""
    return load_plugins()


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(inputs)
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"the model returned {type(out).__name__}, expected a tensor")
    return out.float()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=atol)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.shape == b.shape else math.inf


class TechniqueContract:
    """Subclass as ``Test<Something>`` and set ``technique`` and ``space`` (see the module docstring)."""

    #: the technique under test (or override :meth:`make_technique`)
    technique: ClassVar[Technique | None] = None
    #: its entry-point name; when set, the installed plugin must register this technique
    plugin: ClassVar[str | None] = None
    #: the technique's entry of a search-space file: ``{"layers": [{"match": ..., KNOB: [...]}], "options": {...}}``
    space: ClassVar[Mapping[str, Any] | None] = None
    #: the models every check runs on
    models: ClassVar[Sequence[ModelSpec]] = DEFAULT_MODELS
    #: how many random joint policies (drawn from the resolved space) the round-trip checks use per model
    random_policies: ClassVar[int] = 3
    #: output tolerance for "same outputs" (identity, re-application, save/load)
    atol: ClassVar[float] = 1e-5
    #: settings the technique claims are faster; each is measured
    speedups: ClassVar[Sequence[SpeedupClaim]] = ()

    # --- hooks for subclasses -------------------------------------------------------------------------------------

    def make_technique(self) -> Technique:
        if self.technique is None:
            pytest.fail(f"{type(self).__name__} must set `technique` (or override make_technique)")
        return self.technique

    def space_for(self, spec: ModelSpec, model: nn.Module) -> Mapping[str, Any]:
        """The technique's space entry for one model; override when choices depend on the model."""
        if self.space is None:
            pytest.fail(f"{type(self).__name__} must set `space` (or override space_for)")
        return self.space

    def make_context(self, spec: ModelSpec, model: nn.Module, seed: int = 0, structure_only: bool = False) -> ApplyContext:
        """What a search would hand the technique: calibration batches, a small training set, the teacher."""
        images = spec.images(64, seed=seed + 1)
        labels = torch.randint(0, spec.num_classes, (64,), generator=torch.Generator().manual_seed(seed + 2))

        def calibration():
            for start in range(0, len(images), 16):
                yield images[start : start + 16]

        def evaluate(m: nn.Module) -> float:
            with torch.inference_mode():
                return float((m(images).argmax(-1) == labels).float().mean())

        return ApplyContext(structure_only=structure_only, seed=seed, calibration=calibration,
                            train_data=(images, labels), teacher=model, evaluate=evaluate, cache={})

    def garbage_values(self, knob: str, dimension: Dimension | None) -> list[Any]:
        """Values ``check_value`` must reject for ``knob``; override to add technique-specific ones."""
        values = ["definitely-not-a-valid-value", "", None, math.nan, -7, -0.5, [1, 2], {"x": 1}]
        offered = set() if dimension is None else {repr(v) for v in (*dimension.choices, dimension.identity)}
        return [v for v in values if repr(v) not in offered]

    # --- parametrization ------------------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "spec" in metafunc.fixturenames:
            metafunc.parametrize("spec", list(self.models), ids=[m.id for m in self.models])
        if "claim" in metafunc.fixturenames:
            claims = [pytest.param(c, id=c.id) for c in self.speedups] or [
                pytest.param(None, id="none", marks=pytest.mark.skip(reason="no speedup claimed (set `speedups`)"))
            ]
            metafunc.parametrize("claim", claims)

    # --- helpers --------------------------------------------------------------------------------------------------

    def _techniques(self) -> dict[str, Technique]:
        tech = self.make_technique()
        return {tech.name: tech}

    def _skip_if_declined(self, spec: ModelSpec, model: nn.Module) -> None:
        """An optional architecture the technique offers no layer on is not its business (see ModelSpec)."""
        tech = self.make_technique()
        if spec.optional and tech.layer_knobs and not tech.candidate_layers(model):
            pytest.skip(f"{tech.name} offers no layer on {spec.id}, an optional architecture ({spec.name})")

    def _case(self, spec: ModelSpec) -> _Case:
        model = spec.create()
        self._skip_if_declined(spec, model)
        inputs = spec.images(spec.batch, seed=0)
        case = _Case(spec, model, inputs, _forward(model, inputs))
        tech = self.make_technique()
        raw = {"techniques": {tech.name: dict(self.space_for(spec, model))}}
        case.space = SearchSpace.from_dict(raw, source=f"{type(self).__name__}.space").resolve(model, self._techniques())
        return case

    def _apply(self, case: _Case, policy: Policy, seed: int = 0) -> nn.Module:
        ctx = self.make_context(case.spec, case.model, seed=seed)
        return apply_policy(case.model, policy, self._techniques(), ctx)

    def _uniform_groups(self, case: _Case) -> list[tuple[str, Policy]]:
        """One policy per (knob, value): the value on every layer that offers it, or the option set to it."""
        name = self.make_technique().name
        groups: dict[str, Policy] = {}
        for dim in case.space.dimensions:
            for value in dim.choices:
                if value == dim.identity:
                    continue
                label = f"{dim.knob}={value!r}"
                policy = groups.setdefault(label, Policy(model=case.spec.name))
                settings = policy.techniques.setdefault(name, TechniqueSettings())
                if dim.layer is None:
                    settings.options[dim.knob] = value
                else:
                    settings.layers.setdefault(dim.layer, {})[dim.knob] = value
        return list(groups.items())

    def _random_params(self, case: _Case, seed: int) -> dict[str, Any]:
        rng = random.Random(seed)
        dims = case.space.dimensions
        params = {d.name: rng.choice(d.choices) for d in dims}
        changeable = [d for d in dims if len(d.choices) > 1]
        if changeable and all(params[d.name] == d.identity for d in dims):
            d = rng.choice(changeable)
            params[d.name] = rng.choice([v for v in d.choices if v != d.identity])
        return params

    # --- the contract ---------------------------------------------------------------------------------------------

    def test_declares_name_stage_and_knobs(self) -> None:
        tech = self.make_technique()
        assert isinstance(tech, Technique)
        assert isinstance(tech.name, str) and tech.name, "a technique needs a name"
        assert not set(tech.name) & set(".: "), f"{tech.name!r}: '.', ':' and spaces break parameter names"
        assert isinstance(tech.stage, Stage), f"stage must be an autocompress.Stage, got {tech.stage!r}"
        knobs = {**tech.layer_knobs, **tech.global_knobs}
        assert knobs, "a technique offers at least one layer knob or global knob"
        for knob, identity in knobs.items():
            assert isinstance(knob, str) and knob and not set(knob) & set(".: "), f"bad knob name {knob!r}"
            assert isinstance(identity, _YAML_SCALARS), f"identity of {knob!r} must be a YAML scalar: {identity!r}"

    def test_registered_through_its_entry_point(self) -> None:
        if self.plugin is None:
            pytest.skip("set `plugin` to the entry-point name to check registration")
        plugins = _installed_plugins()
        info = {p.name: p for p in plugins.info}
        assert self.plugin in info, f"no plugin {self.plugin!r} in the 'autocompress' entry-point group"
        assert info[self.plugin].error is None, info[self.plugin].error
        tech = self.make_technique()
        assert tech.name in info[self.plugin].techniques
        assert type(plugins.techniques[tech.name]) is type(tech)

    def test_declares_candidate_layers(self, spec: ModelSpec) -> None:
        tech = self.make_technique()
        model = spec.create()
        self._skip_if_declined(spec, model)
        layers = tech.candidate_layers(model)
        assert isinstance(layers, list) and all(isinstance(n, str) for n in layers)
        if tech.layer_knobs:
            assert layers, f"{tech.name} has per-layer knobs but offers no layer on {spec.id}"
        assert len(set(layers)) == len(layers), "candidate layers repeat"
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        missing = [n for n in layers if n not in order]
        assert not missing, f"not module names of the model: {missing[:3]}"
        assert [order[n] for n in layers] == sorted(order[n] for n in layers), "candidate layers not in model order"
        assert tech.candidate_layers(copy.deepcopy(model)) == layers, "candidate layers must be deterministic"

    def test_space_resolves_with_identity_in_every_dimension(self, spec: ModelSpec) -> None:
        case = self._case(spec)
        dims = case.space.dimensions
        assert dims, f"the space selects nothing on {spec.id}"
        assert any(len(d.choices) > 1 for d in dims), "the space offers no choice besides leaving the model alone"
        candidates = set(self.make_technique().candidate_layers(case.model))
        for d in dims:
            assert d.identity in d.choices
            assert d.layer is None or d.layer in candidates
            assert all(isinstance(v, _YAML_SCALARS) for v in d.choices), f"{d.name}: choices must fit in YAML"

    def test_every_choice_applies_and_keeps_output_shape(self, spec: ModelSpec) -> None:
        case = self._case(spec)
        groups = self._uniform_groups(case)
        assert groups, "no non-identity choice to apply"
        for label, policy in groups:
            out = _forward(self._apply(case, policy), case.inputs)
            assert out.shape == case.dense.shape, f"{label}: output shape {tuple(out.shape)} != {tuple(case.dense.shape)}"
            assert torch.isfinite(out).all(), f"{label}: non-finite outputs"
        assert torch.equal(_forward(case.model, case.inputs), case.dense), "applying a policy changed the input model"

    def test_identity_setting_reproduces_outputs(self, spec: ModelSpec) -> None:
        case = self._case(spec)
        tech = self.make_technique()
        settings = TechniqueSettings()
        for d in case.space.dimensions:
            if d.layer is None:
                settings.options[d.knob] = d.identity
            else:
                settings.layers.setdefault(d.layer, {})[d.knob] = d.identity
        model = tech.apply(copy.deepcopy(case.model), settings, self.make_context(spec, case.model)).eval()
        out = _forward(model, case.inputs)
        assert _close(out, case.dense, self.atol), f"identity settings changed the outputs by {_max_diff(out, case.dense):.3g}"

    def test_policy_round_trips_through_yaml_and_reapplies(self, spec: ModelSpec) -> None:
        case = self._case(spec)
        for i in range(self.random_policies):
            params = self._random_params(case, seed=i)
            policy = case.space.policy(params, model=spec.name)
            text = policy.to_yaml()
            again = Policy.from_yaml(text, source="round-trip")
            assert again.to_dict() == policy.to_dict(), f"YAML round trip changed the policy:\n{text}"
            assert yaml.safe_load(again.to_yaml()) == yaml.safe_load(text)
            assert {**case.space.identities, **again.to_params()} == params, "policy lost or invented settings"
            check_policy(again, case.model, self._techniques(), source="round-trip")
            first = _forward(self._apply(case, policy, seed=i), case.inputs)
            second = _forward(self._apply(case, again, seed=i), case.inputs)
            assert _close(first, second, self.atol), (
                f"re-applying the same policy gave other outputs (max diff {_max_diff(first, second):.3g}):\n{text}"
            )

    def test_save_and_load_compressed_round_trip(self, spec: ModelSpec, tmp_path: Path) -> None:
        case = self._case(spec)
        for i in range(min(2, self.random_policies)):
            policy = case.space.policy(self._random_params(case, seed=100 + i), model=spec.name)
            compressed = self._apply(case, policy, seed=i)
            path = tmp_path / f"compressed-{i}.pt"
            save_compressed(path, compressed, policy, spec.name, dict(spec.kwargs))
            loaded, loaded_policy = load_compressed(path, self._techniques())
            assert loaded_policy.to_dict() == policy.to_dict()
            saved_keys, loaded_keys = set(compressed.state_dict()), set(loaded.state_dict())
            assert saved_keys == loaded_keys, f"state dict keys differ: {sorted(saved_keys ^ loaded_keys)[:4]}"
            a, b = _forward(compressed, case.inputs), _forward(loaded, case.inputs)
            assert _close(a, b, self.atol), f"loaded model differs (max diff {_max_diff(a, b):.3g}):\n{policy.to_yaml()}"

    def test_simulated_layers_are_reported_honestly(self, spec: ModelSpec) -> None:
        case = self._case(spec)
        tech = self.make_technique()
        identity = TechniqueSettings(layers={d.layer: {d.knob: d.identity} for d in case.space.dimensions if d.layer})
        assert tech.simulated_layers(identity) == [], "identity settings cannot be simulated"
        for label, policy in self._uniform_groups(case):
            settings = policy.techniques[tech.name]
            reported = tech.simulated_layers(settings)
            assert reported == tech.simulated_layers(copy.deepcopy(settings)), "simulated_layers must be deterministic"
            changed = {layer for layer, knobs in settings.layers.items()
                       if any(v != tech.layer_knobs.get(k) for k, v in knobs.items())}
            extra = set(reported) - changed
            assert not extra, f"{label}: reports layers it does not change as simulated: {sorted(extra)[:3]}"
            model = self._apply(case, policy)
            flagged = [n for n, m in model.named_modules() if getattr(m, "simulated", False) is True]
            hidden = [n for n in flagged if not any(n == r or n.startswith(r + ".") for r in reported)]
            assert not hidden, f"{label}: modules flag themselves simulated but are not reported: {hidden[:3]}"

    def test_check_value_rejects_garbage(self, spec: ModelSpec) -> None:
        case = self._case(spec)
        tech = self.make_technique()
        layers = tech.candidate_layers(case.model)
        by_knob: dict[tuple[str, bool], Dimension] = {}
        for d in case.space.dimensions:
            by_knob.setdefault((d.knob, d.layer is None), d)
        for knob in tech.layer_knobs:
            dim = by_knob.get((knob, False))
            layer = dim.layer if dim else (layers[0] if layers else None)
            for value in self.garbage_values(knob, dim):
                with pytest.raises(ValueError):
                    tech.check_value(case.model, layer, knob, value)
                    pytest.fail(f"check_value accepted {value!r} for {layer} {knob}")
        for knob in tech.global_knobs:
            dim = by_knob.get((knob, True))
            for value in self.garbage_values(knob, dim):
                with pytest.raises(ValueError):
                    tech.check_value(case.model, None, knob, value)
                    pytest.fail(f"check_value accepted {value!r} for option {knob}")

    def export_plugins(self) -> Plugins:
        """The plugins whose ``autocompress_prepare_export`` run before export: the installed ones."""
        return _installed_plugins()

    def test_exports_to_onnx_or_refuses_naming_the_layer(self, tmp_path: Path) -> None:
        """Each choice of the space on the first model: the ONNX file matches torch in ONNX Runtime (the export's own
        check: fp32 error, or top-1 agreement where layers are int8), or the export says which layer it cannot
        export, in one line, and leaves nothing behind."""
        pytest.importorskip("onnxruntime", reason="export checks need autocompress[onnx]")
        from autocompress.errors import InputError
        from autocompress.export import export_model

        spec = self.models[0]
        case = self._case(spec)
        images = spec.images(64, seed=1)
        plugins = self.export_plugins()
        for label, policy in self._uniform_groups(case):
            out = tmp_path / f"{label.replace('=', '-').replace(chr(39), '')}.onnx"
            model = self._apply(case, policy)
            try:
                result = export_model(model, "onnx", out, images, plugins=plugins, threads=1, log=lambda _: None)
            except InputError as exc:
                assert "\n" not in str(exc) and exc.field, f"{label}: a refusal is one line naming the layer: {exc}"
                assert not list(tmp_path.iterdir()), f"{label}: a refused export left {sorted(tmp_path.iterdir())}"
                continue
            assert result.check.passed and out.is_file(), f"{label}: {result.check.summary('onnx')}"
            out.unlink()

    def test_claimed_speedup_is_real_and_measured(self, claim: SpeedupClaim) -> None:
        why_not = claim.requires() if claim.requires is not None else None
        if why_not:
            pytest.skip(f"{claim.id}: {why_not}")
        tech = self.make_technique()
        model = claim.model.create()
        settings = claim.settings(model) if callable(claim.settings) else claim.settings
        assert tech.simulated_layers(settings) == [], "a speed claim cannot rest on simulated layers"
        policy = Policy(techniques={tech.name: settings}, model=claim.model.name)
        check_policy(policy, model, self._techniques(), source=claim.id)
        compressed = apply_policy(model, policy, self._techniques(), self.make_context(claim.model, model))
        example = claim.model.images(claim.batch, seed=3)
        timing = compare_latency({"dense": model, "compressed": compressed}, example, threads=claim.threads,
                                 warmup=2, repeats=claim.repeats)
        speedup = timing["dense"].median_ms / timing["compressed"].median_ms
        assert speedup > claim.min_speedup, (
            f"{claim.id}: measured {speedup:.2f}x (dense {timing['dense'].median_ms:.1f} ms, compressed "
            f"{timing['compressed'].median_ms:.1f} ms), claimed > {claim.min_speedup}x"
        )

