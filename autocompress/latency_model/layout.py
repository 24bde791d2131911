"""Which layers a latency table covers and which settings each of its entries stands for.

A resolved search space names layers (``blocks.3``, ``blocks.3.attn.qkv``) and the knobs each technique searches on
them. Layers nest: a pruning layer ``blocks.3`` contains the quantization layer ``blocks.3.attn.qkv``, and the
latency of ``blocks.3.attn.qkv`` depends on how many heads ``blocks.3`` keeps. So an entry of the table is the
latency of one layer under a set of **settings**: its own knob values and those of every searched layer that
contains it (its *context*); everything else is left as it is.

The model itself is the outermost layer, named ``""``. Its knobs are the global options that change the model's
structure (``quantization.compute=bf16`` turns every activation to bf16, so it is context for every layer); global
options that change no module class, shape or dtype (recovery training, the factorization method) are *neutral*
and cost nothing.

Settings are written with the search-parameter names of :mod:`autocompress.policy` and only where they differ from
the knob's identity value, so the key of the uncompressed layer is ``""`` and entries stay valid when a space gains
or loses techniques.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from autocompress.space import ResolvedSpace

#: one setting: (search parameter name, value)
Setting = tuple[str, Any]
#: the name of the whole model as a layer (``model.get_submodule("")`` is the model)
MODEL = ""


@dataclass(frozen=True)
class Knob:
    """One searched knob on one layer (``layer`` is ``""`` for a global option)."""

    param: str  # the search parameter name, e.g. "blocks.3.attn.qkv:quantization.format"
    technique: str
    layer: str
    choices: tuple[Any, ...]
    identity: Any


@dataclass(frozen=True)
class LayerSpec:
    """A searched layer: its own knobs (across techniques) and the searched layers that contain it."""

    name: str
    knobs: tuple[Knob, ...]
    ancestors: tuple[str, ...]  # outermost ("" the model) first

    @property
    def parent(self) -> str | None:
        return self.ancestors[-1] if self.ancestors else None


@dataclass(frozen=True)
class Layout:
    """The searched layers of a space with their nesting, the model (``""``) outermost."""

    layers: dict[str, LayerSpec]
    neutral: frozenset[str]  # global options that change nothing a timing depends on

    @classmethod
    def of(cls, space: ResolvedSpace, neutral: Iterable[str] = ()) -> "Layout":
        neutral = frozenset(neutral)
        knobs: dict[str, list[Knob]] = {MODEL: []}
        for dim in space.dimensions:
            if dim.layer is None and dim.name in neutral:
                continue
            layer = dim.layer or MODEL
            knobs.setdefault(layer, []).append(Knob(dim.name, dim.technique, layer, tuple(dim.choices), dim.identity))
        names = list(knobs)
        layers = {}
        for name in names:
            inside = sorted((a for a in names if a and name.startswith(a + ".")), key=len)
            ancestors = () if name == MODEL else (MODEL, *inside)
            layers[name] = LayerSpec(name, tuple(sorted(knobs[name], key=lambda k: k.param)), ancestors)
        return cls(layers, neutral)

    @staticmethod
    def global_knobs(space: ResolvedSpace) -> list[Knob]:
        return [Knob(d.name, d.technique, MODEL, tuple(d.choices), d.identity)
                for d in space.dimensions if d.layer is None]

    @property
    def roots(self) -> list[str]:
        """Searched layers no other searched layer contains: with the residual, they make up the model."""
        return self.children(MODEL)

    def children(self, name: str) -> list[str]:
        return [n for n, spec in self.layers.items() if spec.parent == name]

    def descendants(self, name: str) -> list[str]:
        return [n for n, spec in self.layers.items() if name in spec.ancestors]

    def context_knobs(self, name: str) -> list[Knob]:
        return [k for a in self.layers[name].ancestors for k in self.layers[a].knobs]

    def realisation_root(self, name: str, settings: Iterable[Setting]) -> str:
        """The outermost of ``name`` and its ancestors that ``settings`` change: what must be rebuilt to realise it."""
        changed = {self.layer_of(param) for param, _ in settings}
        for layer in (*self.layers[name].ancestors, name):
            if layer in changed:
                return layer
        return name

    def layer_of(self, param: str) -> str:
        return self._layer_by_param[param]

    @functools.cached_property
    def _layer_by_param(self) -> dict[str, str]:
        return {k.param: spec.name for spec in self.layers.values() for k in spec.knobs}

    def combinations(self, name: str, limit: int) -> tuple[list[tuple[Setting, ...]], str]:
        """The settings to profile for ``name``, the identity first, and how they were chosen:

        * ``"all"``: every combination of its own and its context's knob values, when there are at most ``limit``;
        * ``"own x context"``: every combination of its own knob values, each alone and with each single context
          value (the predictor multiplies the context's measured effects on the layer as it is set), when its own
          combinations are at most ``limit``;
        * ``"each alone"``: each non-identity value alone (the predictor multiplies their ratios).
        """
        context = self.context_knobs(name)
        own = list(self.layers[name].knobs)
        if _product(context + own) <= limit:
            return _all_combinations(context + own), "all"
        if _product(own) <= limit:
            own_combos = self.own_settings(name)
            singles = [(k.param, v) for k in context for v in k.choices if v != k.identity]
            combos = [*own_combos, *((single, *combo) for single in singles for combo in own_combos)]
            return sorted(combos, key=len), "own x context"
        single = [((k.param, v),) for k in context + own for v in k.choices if v != k.identity]
        return [(), *single], "each alone"

    def own_settings(self, name: str) -> list[tuple[Setting, ...]]:
        """Every combination of ``name``'s own knob values (non-identity settings only; the identity ``()`` first)."""
        return _all_combinations(list(self.layers[name].knobs))

    def settings_of(self, params: Mapping[str, Any]) -> dict[str, list[Setting]]:
        """Non-identity settings of a trial's parameters, grouped by layer; neutral global options are dropped."""
        by_param = {k.param: k for spec in self.layers.values() for k in spec.knobs}
        out: dict[str, list[Setting]] = {}
        for param, value in params.items():
            if param in self.neutral:
                continue
            knob = by_param.get(param)
            if knob is None:
                raise KeyError(param)
            if value != knob.identity:
                out.setdefault(knob.layer, []).append((param, value))
        return out


def _product(knobs: list[Knob]) -> int:
    n = 1
    for k in knobs:
        n *= len(k.choices)
    return n


def _all_combinations(knobs: list[Knob]) -> list[tuple[Setting, ...]]:
    combos = [tuple((k.param, v) for k, v in zip(knobs, values) if v != k.identity)
              for values in itertools.product(*(k.choices for k in knobs))]
    return sorted(combos, key=len)


def rename_layer(param_or_layer: str, old_root: str, new_root: str) -> str:
    """``blocks.3.attn.qkv:quantization.format`` with ``blocks.3`` -> ``blocks.0``: the same knob in a congruent
    block. Global options (no layer) are left as they are."""
    layer, sep, rest = param_or_layer.rpartition(":") if ":" in param_or_layer else (param_or_layer, "", "")
    if layer == old_root or layer.startswith(old_root + "."):
        layer = new_root + layer[len(old_root):]
    return f"{layer}{sep}{rest}"


def settings_key(settings: Iterable[Setting]) -> str:
    """The stable text key of a set of non-identity settings (order-free; ``""`` for none)."""
    return ";".join(sorted(f"{param}={json.dumps(value, sort_keys=True)}" for param, value in settings))


def techniques_in_key(key: str) -> set[str]:
    """Which techniques a key's settings belong to (to drop entries when a plugin's version changes)."""
    out = set()
    for part in filter(None, key.split(";")):
        name = part.split("=", 1)[0].rpartition(":")[2]
        out.add(name.partition(".")[0])
    return out


def global_settings(space: ResolvedSpace) -> Iterator[Setting]:
    """Every non-identity value of every global option, alone."""
    for knob in Layout.global_knobs(space):
        for value in knob.choices:
            if value != knob.identity:
                yield knob.param, value
