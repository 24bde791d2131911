"""Apply a policy to a model: each technique in stage order, so they compose. Save and load the result.

A saved compressed model is ``{format, model: {name, kwargs}, policy, state_dict}`` written with ``torch.save`` and
read back with ``weights_only=True``: loading rebuilds the structure by applying the policy with
``structure_only=True`` to a fresh architecture and then loads the weights, so no pickled code is ever executed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from autocompress.errors import InputError, TechniqueError
from autocompress.io import atomic_torch_save
from autocompress.policy import Policy
from autocompress.technique import ApplyContext, Technique, TechniqueSettings, TrialStopped

FORMAT = "autocompress.compressed/1"


def check_policy(policy: Policy, model: nn.Module, techniques: Mapping[str, Technique], source: str = "policy") -> None:
    """Raise :class:`InputError` naming the first setting that does not fit ``model`` or the installed techniques."""
    for name, settings in policy.techniques.items():
        where = f"{source}.techniques.{name}"
        technique = techniques.get(name)
        if technique is None:
            raise InputError(where, f"technique not installed (installed: {', '.join(sorted(techniques)) or 'none'})")
        candidates = set(technique.candidate_layers(model)) if settings.layers else set()
        for layer, knobs in settings.layers.items():
            if layer not in candidates:
                raise InputError(f"{where}.layers.{layer}", f"no such layer for {name} in this model")
            for knob, value in knobs.items():
                if knob not in technique.layer_knobs:
                    raise InputError(f"{where}.layers.{layer}.{knob}", f"unknown knob for {name}")
                try:
                    technique.check_value(model, layer, knob, value)
                except ValueError as exc:
                    raise InputError(f"{where}.layers.{layer}.{knob}", f"{value!r}: {exc}") from None
        for knob, value in settings.options.items():
            if knob not in technique.global_knobs:
                raise InputError(f"{where}.options.{knob}", f"unknown option for {name}")
            try:
                technique.check_value(model, None, knob, value)
            except ValueError as exc:
                raise InputError(f"{where}.options.{knob}", f"{value!r}: {exc}") from None


def apply_policy(
    model: nn.Module,
    policy: Policy,
    techniques: Mapping[str, Technique],
    ctx: ApplyContext | None = None,
    inplace: bool = False,
) -> nn.Module:
    """The compressed model. ``model`` itself is left untouched unless ``inplace``."""
    ctx = ctx or ApplyContext()
    if not inplace:
        model = copy.deepcopy(model)
    used = [techniques[name] for name in policy.techniques if name in techniques]
    missing = [name for name in policy.techniques if name not in techniques]
    if missing:
        raise InputError(f"policy.techniques.{missing[0]}", "technique not installed")
    present = {name for name, _ in model.named_modules()}
    for technique in sorted(used, key=lambda t: (int(t.stage), t.name)):
        settings = _without_removed(policy.techniques[technique.name], model, present)
        if settings.is_empty():
            continue
        torch.manual_seed(ctx.seed)
        try:
            model = technique.apply(model, settings, ctx)
        except (InputError, TrialStopped):  # a stop request is the search's decision, not a technique failure
            raise
        except Exception as exc:
            raise TechniqueError(f"{technique.name}: {type(exc).__name__}: {exc}") from exc
    return model.eval()


def _without_removed(settings: TechniqueSettings, model: nn.Module, present: set[str]) -> TechniqueSettings:
    """``settings`` less the layers an earlier technique removed (a pruned-away attention's Linears): they were in
    the model the policy was made for and are not any more, so there is nothing left of them to compress. A layer the
    model never had stays, for the technique to refuse by name."""
    if not settings.layers:
        return settings
    now = {name for name, _ in model.named_modules()}
    gone = [layer for layer in settings.layers if layer in present and layer not in now]
    if not gone:
        return settings
    return TechniqueSettings(layers={k: v for k, v in settings.layers.items() if k not in gone},
                             options=dict(settings.options))


def without_void(policy: Policy, original: nn.Module, compressed: nn.Module) -> Policy:
    """``policy`` less the layer settings :func:`apply_policy` had to skip (:func:`_without_removed`, here with
    ``compressed`` as the model after the technique that removed them). Applied to ``original`` it builds the same
    model, and it says only what was done, so it is the policy a run saves. A technique left with nothing is dropped."""
    present = {name for name, _ in original.named_modules()}
    kept = Policy(model=policy.model)
    for name, settings in policy.techniques.items():
        left = _without_removed(settings, compressed, present)
        if left.is_empty() and not settings.is_empty():
            continue  # every layer it set went with a removed branch
        kept.techniques[name] = copy.deepcopy(left)
    return kept


def simulated_layers(policy: Policy, techniques: Mapping[str, Technique]) -> list[str]:
    """Layers whose chosen format has no real kernel (counted for memory, never for speed)."""
    out: list[str] = []
    for name, settings in policy.techniques.items():
        if name in techniques:
            out += [f"{layer}:{name}" for layer in techniques[name].simulated_layers(settings)]
    return out


def save_compressed(path: str | Path, model: nn.Module, policy: Policy, model_name: str, model_kwargs: dict[str, Any]) -> None:
    payload = {
        "format": FORMAT,
        "model": {"name": model_name, "kwargs": dict(model_kwargs)},
        "policy": policy.to_yaml(),
        "state_dict": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(payload, Path(path))


def load_compressed(path: str | Path, techniques: Mapping[str, Technique]) -> tuple[nn.Module, Policy]:
    """Rebuild a model saved by :func:`save_compressed`; returns ``(model, policy)``."""
    from autocompress.models import create_model

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "compressed model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(str(path), f"cannot read compressed model ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(str(path), f"not an autocompress compressed model (expected format {FORMAT})")
    policy = Policy.from_yaml(payload["policy"], source=f"{path}:policy")
    spec = payload["model"]
    model = create_model(spec["name"], spec["kwargs"], field=f"{path}:model")
    check_policy(policy, model, techniques, source=f"{path}:policy")
    model = apply_policy(model, policy, techniques, ApplyContext(structure_only=True), inplace=True)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise InputError(str(path), f"weights do not fit the rebuilt model ({str(exc).splitlines()[0]})") from None
    return model.eval(), policy
