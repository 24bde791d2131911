"""Search spaces: which layers each technique may touch and which values it may choose there.

A space file (``search_spaces/*.yaml``) is data::

    techniques:
      quantization:
        layers:
          - match: "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))"
            format: [fp32, bf16, int8_dynamic]
        options: {}
      distillation:
        options:
          steps: [0, 100, 200]

``match`` is an exact module name, a shell glob (``blocks.*.attn.qkv``) or a regular expression after ``re:``
(matched against the whole name). Later entries override earlier ones for the same layer. Resolving a space
against a model turns it into a flat list of :class:`Dimension` with stable parameter names. Leaving a layer as it
is (the knob's identity value) is always one of the choices, so the uncompressed model lies in every space.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml
from pydantic import AfterValidator, Field, TypeAdapter
from torch import nn
from typing_extensions import Required, TypedDict  # pydantic needs these before Python 3.12

from autocompress import schema
from autocompress.errors import InputError, yaml_error_where
from autocompress.policy import Policy, param_name
from autocompress.schema import Rule, only_keys, says
from autocompress.technique import Technique


def _layer_rule(rule: Any) -> Any:
    if not isinstance(rule, Mapping) or not isinstance(rule.get("match"), str):
        raise Rule("each layer rule needs a 'match' pattern", key="match")
    for knob, choices in rule.items():
        if knob != "match" and (not isinstance(choices, list) or not choices):
            raise Rule("must be a non-empty list of choices", key=str(knob))
    return rule


# the file's schema (autocompress/schema.py turns its first error into one line naming the field)
_Choices = Annotated[list[Any], Field(min_length=1), says("must be a non-empty list of choices")]


class _TechniqueEntry(TypedDict, total=False):
    layers: Annotated[list[Annotated[Any, AfterValidator(_layer_rule)]] | None,
                      says("must be a list of {match: PATTERN, KNOB: [choices]}")]
    options: Annotated[dict[Any, _Choices] | None, says("must map option names to lists of choices")]


class _SpaceFile(TypedDict, total=False):
    techniques: Required[dict[Any, Annotated[_TechniqueEntry | None, only_keys("layers", "options"),
                                             says("must be a mapping with 'layers' and/or 'options'")]]]
    description: Any
    baselines: dict[Any, dict[Any, dict[Any, Any]]] | None


_SPACE_FILE = TypeAdapter(Annotated[_SpaceFile, only_keys("techniques", "baselines", "description")])
_SPACE_MESSAGES = {"baselines": "must map a name to {technique: {knob: value}}"}

#: where a builtin space name ('vit') is looked up: inside the installed package (a wheel carries search_spaces/ as
#: autocompress/_spaces, see hatch_build.py), then the source checkout (an editable install)
BUILTIN_SPACES_DIRS = tuple(
    folder
    for folder in (Path(str(resources.files("autocompress") / "_spaces")),
                   Path(__file__).resolve().parent.parent / "search_spaces")
    if folder.is_dir()
)


@dataclass(frozen=True)
class Dimension:
    """One searched parameter."""

    name: str  # stable parameter name, see autocompress.policy.param_name
    technique: str
    knob: str
    layer: str | None
    choices: tuple[Any, ...]
    identity: Any


@dataclass
class SearchSpace:
    """A space as written in the file, not yet tied to a model."""

    techniques: dict[str, dict[str, Any]]
    source: str = "space"
    #: named extra baselines: {name: {technique: {knob: value}}}; a layer knob's value goes to all its layers
    baselines: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: a builtin space fits itself to the model in hand: what a technique cannot do there (a layer kind it does not
    #: know, a plugin not installed) is left out and said (ResolvedSpace.left_out); a user's own space is held to
    #: the letter, and such a rule is an error naming it
    adapts: bool = False

    @classmethod
    def load(cls, path_or_name: str | Path) -> "SearchSpace":
        path = find_space_file(path_or_name)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(str(path), f"not valid YAML ({yaml_error_where(exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(str(path), f"cannot read search space ({getattr(exc, 'strerror', None) or exc})") from None
        space = cls.from_dict(data, source=str(path))
        space.adapts = any(path.resolve().parent == folder.resolve() for folder in BUILTIN_SPACES_DIRS)
        return space

    @classmethod
    def from_dict(cls, data: Any, source: str = "space") -> "SearchSpace":
        if not isinstance(data, Mapping) or not isinstance(data.get("techniques"), Mapping):
            raise InputError(f"{source}.techniques", "a search space needs a 'techniques' mapping")
        checked = schema.check(_SPACE_FILE, data, source, messages=_SPACE_MESSAGES)
        techniques = {str(name): {"layers": list((entry or {}).get("layers") or []),
                                  "options": dict((entry or {}).get("options") or {})}
                      for name, entry in checked["techniques"].items()}
        baselines = checked.get("baselines") or {}
        return cls(techniques=techniques, source=source,
                   baselines={str(k): {t: dict(v) for t, v in b.items()} for k, b in baselines.items()})

    def resolve(self, model: nn.Module, available: Mapping[str, Technique]) -> "ResolvedSpace":
        """Tie the space to ``model``: expand patterns to module names and check every choice."""
        dims: list[Dimension] = []
        left_out: dict[str, str] = {}
        for tech_name, entry in self.techniques.items():
            where = f"{self.source}.techniques.{tech_name}"
            technique = available.get(tech_name)
            if technique is None:
                if self.adapts:
                    left_out[tech_name] = f"{tech_name}: not installed, left out of the search"
                    continue
                raise InputError(
                    where, f"unknown technique (installed: {', '.join(sorted(available)) or 'none'})"
                )
            unusable = _Unusable(tech_name, strict=not self.adapts)
            candidates = technique.candidate_layers(model)
            per_layer: dict[str, dict[str, list[Any]]] = {}
            for i, rule in enumerate(entry["layers"]):
                field_name = f"{where}.layers[{i}].match"
                matched = unusable.matched(rule["match"], candidates, field_name)
                for knob, choices in rule.items():
                    if knob == "match":
                        continue
                    if knob not in technique.layer_knobs:
                        raise InputError(
                            f"{where}.layers[{i}].{knob}",
                            f"unknown knob (technique {tech_name!r} offers: {', '.join(technique.layer_knobs)})",
                        )
                    for layer in matched:
                        usable = [value for value in choices if unusable.check(
                            technique, model, layer, knob, value, f"{where}.layers[{i}].{knob}")]
                        per_layer.setdefault(layer, {})[knob] = usable
            for layer in candidates:  # keep model order
                for knob, choices in per_layer.get(layer, {}).items():
                    identity = technique.layer_knobs[knob]
                    if not [c for c in choices if c != identity]:
                        continue  # nothing but "leave it" is left here (only when adapting: said in left_out)
                    dims.append(
                        Dimension(param_name(tech_name, knob, layer), tech_name, knob, layer,
                                  _with_identity(choices, identity), identity)
                    )
            for knob, choices in entry["options"].items():
                if knob not in technique.global_knobs:
                    raise InputError(
                        f"{where}.options.{knob}",
                        f"unknown option (technique {tech_name!r} offers: "
                        f"{', '.join(technique.global_knobs) or 'none'})",
                    )
                for value in choices:
                    _check(technique, model, None, knob, value, f"{where}.options.{knob}")
                identity = technique.global_knobs[knob]
                dims.append(
                    Dimension(param_name(tech_name, knob), tech_name, knob, None,
                              _with_identity(choices, identity), identity)
                )
            if unusable.reasons:
                left_out[tech_name] = unusable.summary()
        resolved = ResolvedSpace(dims, left_out=left_out)
        for label, settings in self.baselines.items():
            try:
                resolved.extra_baselines[label] = resolved.params_for(settings, f"{self.source}.baselines.{label}")
            except InputError:
                if not (self.adapts and left_out):
                    raise  # a builtin baseline that no longer fits this model is dropped with what it needed
        return resolved


class _Unusable:
    """What one technique cannot do on the model in hand, for a space that adapts; raises at once for one that
    does not (today's one-line errors naming the rule)."""

    def __init__(self, technique: str, strict: bool) -> None:
        self.technique, self.strict = technique, strict
        self.reasons: dict[str, list[str]] = {}  # why -> the layers (or rules) it applies to, in order

    def matched(self, pattern: str, candidates: list[str], field_name: str) -> list[str]:
        try:
            return match_layers(pattern, candidates, field_name)
        except InputError:
            if self.strict:
                raise
            self.reasons.setdefault(f"{pattern!r} matches no layer it can act on in this model", [])
            return []

    def check(self, technique: Technique, model: nn.Module, layer: str, knob: str, value: Any, field_name: str) -> bool:
        if self.strict:
            _check(technique, model, layer, knob, value, field_name)
            return True
        try:
            technique.check_value(model, layer, knob, value)
            return True
        except ValueError as exc:
            layers = self.reasons.setdefault(f"{knob}: {exc}", [])
            if layer not in layers:
                layers.append(layer)
            return False

    def summary(self) -> str:
        parts = []
        for why, layers in self.reasons.items():
            where = ""
            if layers:
                shown = ", ".join(layers[:3]) + (f", ... {layers[-1]}" if len(layers) > 3 else "")
                where = f" on {len(layers)} layer{'s' if len(layers) != 1 else ''} ({shown})"
            parts.append(f"{why}{where}")
        return f"{self.technique}: left out of the search for this model: " + "; ".join(parts)


@dataclass
class ResolvedSpace:
    """A space tied to one model: the flat list of searched parameters."""

    dimensions: list[Dimension]
    extra_baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: technique -> one line saying what an adapting (builtin) space left out for this model, and why
    left_out: dict[str, str] = field(default_factory=dict)

    def params_for(self, settings: Mapping[str, Mapping[str, Any]], where: str = "baseline") -> dict[str, Any]:
        """Parameters with ``{technique: {knob: value}}`` applied to every matching dimension, identity elsewhere."""
        params = self.identities
        for tech, knobs in settings.items():
            for knob, value in knobs.items():
                dims = [d for d in self.dimensions if d.technique == tech and d.knob == knob]
                if not dims:
                    raise InputError(f"{where}.{tech}.{knob}", "not a searched knob of this space")
                for d in dims:
                    if value not in d.choices:
                        raise InputError(f"{where}.{tech}.{knob}", f"{value!r} is not among the choices for {d.name}")
                    params[d.name] = value
        return params

    @property
    def identities(self) -> dict[str, Any]:
        return {d.name: d.identity for d in self.dimensions}

    def techniques(self) -> list[str]:
        return sorted({d.technique for d in self.dimensions})

    def policy(self, params: Mapping[str, Any], model: str | None = None) -> Policy:
        return Policy.from_params(params, self.identities, model=model)

    def uncompressed(self) -> dict[str, Any]:
        return self.identities

    def layer_knobs(self) -> dict[tuple[str, str], list[Dimension]]:
        """The per-layer dimensions grouped by ``(technique, knob)``, in the order they first appear."""
        groups: dict[tuple[str, str], list[Dimension]] = {}
        for dim in self.dimensions:
            if dim.layer is not None:
                groups.setdefault((dim.technique, dim.knob), []).append(dim)
        return groups

    def uniform_baselines(self) -> dict[str, dict[str, Any]]:
        """One policy per technique knob and value, on every layer that offers it ('every layer bf16', 'rank 0.5'),
        then the space file's named baselines."""
        out: dict[str, dict[str, Any]] = {}
        for (tech, knob), dims in self.layer_knobs().items():
            values: list[Any] = []
            for d in dims:
                values += [v for v in d.choices if v not in values and v != d.identity]
            for value in values:
                out[f"uniform {tech}.{knob}={value}"] = self.uniform(tech, knob, value)
        out.update(self.extra_baselines)
        return out

    def uniform(self, technique: str, knob: str, value: Any) -> dict[str, Any]:
        """Parameters with ``value`` on every dimension of ``technique.knob`` that offers it, identity elsewhere."""
        params = self.identities
        params.update({d.name: value for d in self.dimensions
                       if d.technique == technique and d.knob == knob and value in d.choices})
        return params

    def composed_baselines(self, costs: Mapping[str, float], limit: float = 0.0,
                           margin: float = 0.8) -> dict[str, dict[str, Any]]:
        """Policies that compose the measured baselines, from the least to the most compressed, aimed at a budget.

        ``costs`` maps the labels of :meth:`uniform_baselines` (and ``"uncompressed"``) to the budgeted cost each
        measured (NaN when not measured); ``limit`` is the budget in the same unit. The chain starts from the
        cheapest baseline and adds, one at a time, the cheapest uniform value of each knob that baseline leaves
        untouched, most effective first, until the cost estimated as the product of the measured ratios is within
        ``margin`` x the limit; then one last policy adds all the remaining knobs at once (the estimate is optimistic:
        int8 on a factorized layer gains less than on a dense one, so the most compressed corner is always tried).
        Nothing is composed when the cheapest baseline already meets the budget. Only measured numbers go in,
        so the chain follows the machine (bf16 first on one CPU, int8 on another); the estimate only decides where
        the chain stops, and every policy in it is measured like any other trial.

        A tight budget that no single technique meets is usually met by composing them, in a corner that random
        draws over dozens of per-layer knobs rarely reach: a search seeded with the chain starts next to it.
        Labels say what was composed (``"composed: bf16 everywhere + pruning.mlp=0.5"``). Empty when no baseline
        beat the uncompressed model.
        """
        def cost(label: str) -> float:
            value = costs.get(label, math.nan)
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf

        base = cost("uncompressed")
        baselines = {label: params for label, params in self.uniform_baselines().items() if cost(label) < base}
        if not baselines or not math.isfinite(base) or base <= 0:
            return {}
        start = min(baselines, key=cost)
        params = dict(baselines[start])
        additions = []  # (ratio, label, dims) of each knob the start leaves untouched
        for (tech, knob), dims in self.layer_knobs().items():
            if any(params[d.name] != d.identity for d in dims):
                continue
            labels = [label for label in baselines if label.startswith(f"uniform {tech}.{knob}=")]
            if labels:
                best = min(labels, key=cost)
                additions.append((cost(best) / base, best, dims))
        additions.sort(key=lambda a: a[0])
        out: dict[str, dict[str, Any]] = {}
        ratio, name = cost(start) / base, start
        if ratio * base <= limit:
            return out  # the cheapest baseline already meets the budget: the search has a feasible start
        stopped = False
        for step_ratio, label, dims in additions:
            if ratio * base <= margin * limit and not stopped:
                stopped = True  # estimated within budget: the rest goes into one last, most compressed policy
                name += " + all the others"
            for d in dims:
                params[d.name] = baselines[label][d.name]
            ratio *= step_ratio
            if not stopped:
                name += " + " + label.removeprefix("uniform ")
                out[f"composed: {name}"] = dict(params)
        if stopped:
            out[f"composed: {name}"] = dict(params)
        return out

    def size(self) -> int:
        n = 1
        for d in self.dimensions:
            n *= len(d.choices)
        return n


def match_layers(pattern: str, candidates: list[str], field: str) -> list[str]:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise InputError(field, f"bad regular expression ({exc})") from None
        matched = [c for c in candidates if rx.fullmatch(c)]
    elif any(ch in pattern for ch in "*?["):
        matched = [c for c in candidates if fnmatch.fnmatchcase(c, pattern)]
    else:
        matched = [c for c in candidates if c == pattern]
    if not matched:
        shown = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
        raise InputError(field, f"{pattern!r} matches no layer the technique can act on (candidates: {shown})")
    return matched


def is_space_path(value: str) -> bool:
    """Whether a space is given as a file path (relative to where it was written) rather than a builtin name."""
    return "/" in value or value.endswith((".yaml", ".yml")) or Path(value).suffix != ""


def find_space_file(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix == "" and path.parent == Path("."):
        for folder in BUILTIN_SPACES_DIRS:
            candidate = folder / f"{path.name}.yaml"
            if candidate.is_file():
                return candidate
    raise InputError("space", f"no search space file {str(path_or_name)!r} (a path, or a builtin name like 'vit')")


def _check(technique: Technique, model: nn.Module, layer: str | None, knob: str, value: Any, field: str) -> None:
    try:
        technique.check_value(model, layer, knob, value)
    except ValueError as exc:
        where = f" for {layer}" if layer else ""
        raise InputError(field, f"{value!r} cannot be applied{where}: {exc}") from None


def _with_identity(choices: list[Any], identity: Any) -> tuple[Any, ...]:
    return tuple(choices) if identity in choices else (identity, *choices)
