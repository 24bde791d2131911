"""A compression policy: per-layer settings keyed by module-name strings, plus global options, per technique.

Policies are plain data, so they fit in YAML, in an Optuna trial's parameters and in a pandas row. Trial parameter
names are stable across trials: ``"<layer>:<technique>.<knob>"`` for a layer setting (``blocks.3.attn.qkv:
quantization.format``) and ``"<technique>.<knob>"`` for a global one (``distillation.steps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml
from pydantic import AfterValidator, StrictStr, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from autocompress import schema
from autocompress.errors import InputError, yaml_error_where
from autocompress.schema import Rule, only_keys, says
from autocompress.technique import TechniqueSettings

_SCALARS = (str, int, float, bool, type(None))


def _scalar(value: Any) -> Any:
    if not isinstance(value, _SCALARS):
        raise Rule("must be a number, string or bool")
    return value


# the file's schema (autocompress/schema.py turns its first error into one line naming the field)
_Value = Annotated[Any, AfterValidator(_scalar)]
_Knobs = Annotated[dict[Any, _Value], says("must map knob names to values")]


class _TechniqueEntry(TypedDict, total=False):
    layers: Annotated[dict[Any, _Knobs] | None, says("must map module names to settings")]
    options: Annotated[dict[Any, _Value] | None, says("must map option names to values")]


class _PolicyFile(TypedDict, total=False):
    model: Annotated[StrictStr | None, says("must be a model name")]
    techniques: Annotated[dict[Any, Annotated[_TechniqueEntry, only_keys("layers", "options"),
                                              says("must be a mapping with 'layers' and/or 'options'")]] | None,
                          says("must be a mapping of technique name to settings")]


_POLICY_FILE = TypeAdapter(Annotated[_PolicyFile, only_keys("model", "techniques")])


def param_name(technique: str, knob: str, layer: str | None = None) -> str:
    """The stable search-parameter name of one knob."""
    return f"{technique}.{knob}" if layer is None else f"{layer}:{technique}.{knob}"


def parse_param_name(name: str) -> tuple[str, str, str | None]:
    """``(technique, knob, layer)`` from a parameter name made by :func:`param_name`."""
    layer, sep, rest = name.rpartition(":")
    technique, dot, knob = rest.partition(".")
    if not dot or not technique or not knob:
        raise InputError(f"params.{name}", "expected '<layer>:<technique>.<knob>' or '<technique>.<knob>'")
    return technique, knob, (layer if sep else None)


@dataclass
class Policy:
    """Settings per technique. Empty means: the uncompressed model."""

    techniques: dict[str, TechniqueSettings] = field(default_factory=dict)
    model: str | None = None  # the model name the policy was made for, checked when it is applied

    # --- search parameters ------------------------------------------------------------------------------------

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        identities: Mapping[str, Any] | None = None,
        model: str | None = None,
    ) -> "Policy":
        """Build a policy from trial parameters; values equal to ``identities[name]`` are left out."""
        identities = identities or {}
        policy = cls(model=model)
        for name, value in params.items():
            if name in identities and identities[name] == value:
                continue
            technique, knob, layer = parse_param_name(name)
            settings = policy.techniques.setdefault(technique, TechniqueSettings())
            if layer is None:
                settings.options[knob] = value
            else:
                settings.layers.setdefault(layer, {})[knob] = value
        return policy

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for technique, settings in self.techniques.items():
            for layer, knobs in settings.layers.items():
                for knob, value in knobs.items():
                    params[param_name(technique, knob, layer)] = value
            for knob, value in settings.options.items():
                params[param_name(technique, knob)] = value
        return params

    # --- plain data / YAML ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        techniques = {}
        for name in sorted(self.techniques):
            settings = self.techniques[name]
            if settings.is_empty():
                continue
            entry: dict[str, Any] = {}
            if settings.layers:
                entry["layers"] = {layer: dict(knobs) for layer, knobs in settings.layers.items()}
            if settings.options:
                entry["options"] = dict(settings.options)
            techniques[name] = entry
        return {"model": self.model, "techniques": techniques}

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> "Policy":
        if not isinstance(data, Mapping):
            raise InputError(source, "a policy must be a mapping with 'techniques'")
        checked = schema.check(_POLICY_FILE, data, source)
        techniques = {
            str(tech): TechniqueSettings(layers={str(k): dict(v) for k, v in (entry.get("layers") or {}).items()},
                                         options=dict(entry.get("options") or {}))
            for tech, entry in (checked.get("techniques") or {}).items()
        }
        return cls(techniques=techniques, model=checked.get("model"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "policy") -> "Policy":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(source, f"not valid YAML ({yaml_error_where(exc)})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InputError(str(path), f"cannot read policy ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise InputError(str(path), "not a text file (expected a YAML policy)") from None
        return cls.from_yaml(text, source=str(path))

    def summary(self) -> str:
        """A short human description, e.g. for tables: ``quantization: 24 layers; pruning: 6 layers``."""
        parts = []
        for name, settings in sorted(self.techniques.items()):
            bits = []
            if settings.layers:
                bits.append(f"{len(settings.layers)} layers")
            if settings.options:
                bits.append(", ".join(f"{k}={v}" for k, v in settings.options.items()))
            parts.append(f"{name}: {'; '.join(bits)}")
        return "; ".join(parts) or "uncompressed"
