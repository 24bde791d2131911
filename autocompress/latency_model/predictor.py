"""Predict a policy's end-to-end latency from the lookup table, without building or running the model.

    predicted = residual + sum over searched root layers of their contribution + global option deltas

A root layer with no searched layers inside contributes its table entry. A layer that contains searched layers
(a pruned block holding quantized Linears) contributes its own entry under its settings, minus its searched
children's uncompressed entries under those settings (what is left is its attention matmuls, norms, activations),
plus each child's contribution under those settings; so nothing is counted twice. The residual is the uncompressed
model's end-to-end time minus its root entries: every cost outside the searched layers.

The prediction is calibrated (:meth:`LatencyPredictor.calibrated`) so the uncompressed model predicts exactly its
end-to-end time measured in the current process; machine load then shifts predictions and measurements alike.
"""

from __future__ import annotations

from typing import Any, Mapping

from autocompress.errors import AutocompressError
from autocompress.latency_model.layout import MODEL, Layout, Setting, global_settings, settings_key
from autocompress.latency_model.table import LatencyTable
from autocompress.policy import Policy
from autocompress.space import ResolvedSpace


class LatencyModelError(AutocompressError):
    """The table has no usable entry for a setting (not profiled, or the technique failed to realise it)."""


class LatencyPredictor:
    """Latency of a policy as the sum of its layers' table entries plus the residual, in milliseconds."""

    def __init__(self, table: LatencyTable, space: ResolvedSpace | Layout, scale: float = 1.0) -> None:
        if table.base_ms is None:
            raise LatencyModelError("the latency table has no end-to-end time of the uncompressed model")
        self.table = table
        if isinstance(space, Layout):
            self.layout = space
        else:
            settings = list(global_settings(space))
            unclassified = [p for p, v in settings if settings_key([(p, v)]) not in table.global_options]
            if unclassified:
                raise LatencyModelError(f"global option {unclassified[0]} is not in the latency table (profile again)")
            self.layout = Layout.of(space, table.neutral_options(settings))
        self.scale = scale
        self._children = {name: self.layout.children(name) for name in self.layout.layers}

    @property
    def base_ms(self) -> float:
        """The uncompressed model's predicted (= measured, after calibration) latency."""
        return float(self.table.base_ms) * self.scale

    @property
    def residual_ms(self) -> float:
        """What the table's entries do not cover: the uncompressed model minus its top-level layers' entries."""
        return self._residual(()) * self.scale

    def _residual(self, context: tuple[Setting, ...]) -> float:
        """The residual under global options: the uncompressed residual times the ratio measured for the residual
        itself in the same passes (where profiled), not the difference of two large, separately timed numbers."""
        base = float(self.table.base_ms) - sum(self._lookup(root, ()) for root in self.layout.roots)
        if not context:
            return base
        entry = self.table.entry(MODEL, settings_key(context))
        if entry is not None and "residual_ratio" in entry:
            return base * float(entry["residual_ratio"])
        return self._lookup(MODEL, context) - sum(self._lookup(root, context) for root in self.layout.roots)

    def calibrated(self, measured_base_ms: float) -> "LatencyPredictor":
        """A predictor whose uncompressed prediction equals ``measured_base_ms`` (timed in this process)."""
        return LatencyPredictor(self.table, self.layout, scale=measured_base_ms / float(self.table.base_ms))

    def layer_ms(self, name: str, settings: tuple[Setting, ...] = ()) -> float:
        """The time of searched layer ``name`` under ``settings`` (its own and its context's), its searched
        children included as the settings leave them (what the solver costs one option of one layer by)."""
        return self._lookup(name, tuple(settings)) * self.scale

    def residual_under(self, context: tuple[Setting, ...] = ()) -> float:
        """The residual (time outside every searched layer) under global options ``context``."""
        return self._residual(tuple(context)) * self.scale

    def predict(self, policy: Policy | Mapping[str, Any]) -> float:
        """Predicted end-to-end milliseconds of ``policy`` (a Policy or a trial's search parameters)."""
        return sum(self.breakdown(policy).values())

    def breakdown(self, policy: Policy | Mapping[str, Any]) -> dict[str, float]:
        """The prediction split into the ``residual`` (under the policy's global options) and one contribution per
        top-level searched layer; the values sum to :meth:`predict`."""
        params = policy.to_params() if isinstance(policy, Policy) else dict(policy)
        try:
            settings = self.layout.settings_of(params)
        except KeyError as exc:
            raise LatencyModelError(f"{exc.args[0]} is not a searched parameter of the profiled space") from None
        context = tuple(settings.get(MODEL, ()))
        out = {"residual": self._residual(context) * self.scale}
        for root in self.layout.roots:
            out[root] = self._contribution(root, context, settings) * self.scale
        return out

    def _contribution(self, name: str, context: tuple[Setting, ...], settings: dict[str, list[Setting]]) -> float:
        inner = context + tuple(settings.get(name, ()))
        total = self._lookup(name, inner)
        for child in self._children[name]:
            total += self._contribution(child, inner, settings) - self._lookup(child, inner)
        return total

    def _lookup(self, name: str, settings: tuple[Setting, ...]) -> float:
        """The time of ``name`` under ``settings``: its in-context time times the measured ratio (or plus the
        measured whole-model delta). Where the exact combination was not profiled (see ``Layout.combinations``):
        the layer as set, times each context setting's measured effect on the layer as set; failing that, each
        setting's own ratio in turn."""
        identity = self.table.entry(name, "")
        if identity is None or "ms" not in identity:
            raise LatencyModelError(f"{name} is not in the latency table (profile again)")
        value = float(identity["ms"])
        if not settings:
            return value
        exact = self.table.entry(name, settings_key(settings))
        if exact is not None:
            return self._apply(value, exact, name, settings)
        own = tuple(s for s in settings if self.layout.layer_of(s[0]) == name)
        context = [s for s in settings if s not in own]
        with_own = [self.table.entry(name, settings_key((c, *own))) for c in context]
        own_entry = self.table.entry(name, settings_key(own)) if own else {"ratio": 1.0}
        if own_entry is not None and all(e is not None for e in with_own):
            as_set = self._apply(value, own_entry, name, own)
            result = as_set
            for c, entry in zip(context, with_own):
                with_c = self._apply(value, entry, name, (c, *own))
                result = result * with_c / as_set if as_set > 0 else result + with_c - as_set
            return result
        for setting in settings:
            single = self.table.entry(name, settings_key([setting]))
            if single is None:
                raise LatencyModelError(f"{name}: {setting[0]}={setting[1]!r} is not in the latency table")
            value = self._apply(value, single, name, (setting,))
        return value

    def _apply(self, value: float, entry: dict[str, Any], name: str, settings: tuple[Setting, ...]) -> float:
        if "ratio" in entry:
            return value * float(entry["ratio"])
        if "delta" in entry:
            return value + float(entry["delta"]) * float(self.table.base_ms)
        raise LatencyModelError(f"{name}: {settings_key(settings)} {entry.get('how', 'has no timing')}")
