"""The low-rank technique: per block Linear, keep it dense or replace it by two smaller Linears at a chosen rank.

Per-layer knob ``rank``: ``1.0`` keeps the layer dense (the identity); a float in (0, 1) is a fraction of the full
rank ``min(in, out)`` (rounded to the nearest integer, at least 1); an int >= 1 is an absolute rank. A rank that would
not reduce cost (``r >= in * out / (in + out)``) is rejected when a space or policy is checked. If an earlier stage
(pruning) has shrunk a layer so much that its rank no longer saves anything, the layer is left dense, the same way
whether the model is being compressed or rebuilt for loading.

Global option ``method``: ``svd`` (plain truncated SVD, the identity) or ``activation_aware`` (whitened by the
second moment of the layer's inputs on the calibration batches, see :mod:`autocompress_lowrank.factorize`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings, replace_module

from autocompress_lowrank.factorize import Factors, input_second_moments, svd_factors, whitened_factors
from autocompress_lowrank.modules import LowRankLinear, break_even_rank, saves_cost

METHODS = ("svd", "activation_aware")
#: the Linears of a transformer block, at any depth (``blocks.3.attn.qkv``, ``layers.0.blocks.1.mlp.fc2``)
BLOCK_LINEAR = re.compile(r"(?:.*\.)?blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))")
#: how many distinct models' factors to keep in the run cache (a trial that pruned first has its own)
CACHE_MODELS = 2


def resolve_rank(value: Any, in_features: int, out_features: int) -> int | None:
    """The integer rank ``value`` asks for on an in x out layer; None for the identity ``1.0`` (stay dense)."""
    check_rank_value(value)
    if isinstance(value, float):
        if value == 1.0:
            return None
        return max(1, math.floor(value * min(in_features, out_features) + 0.5))
    return int(value)


def check_rank_value(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is 1.0, a fraction in (0, 1) or an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("rank must be 1.0 (dense), a fraction in (0, 1) or an integer rank >= 1")
    if isinstance(value, float) and not (0.0 < value <= 1.0):
        raise ValueError("a fractional rank must be in (0, 1]; write an absolute rank as an integer")
    if isinstance(value, int) and value < 1:
        raise ValueError("an absolute rank must be >= 1")


class LowRankTechnique(Technique):
    name = "lowrank"
    stage = Stage.FACTORIZATION
    layer_knobs = {"rank": 1.0}
    global_knobs = {"method": "svd"}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return [name for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and BLOCK_LINEAR.fullmatch(name)]

    def check_value(self, model: nn.Module, layer: str | None, knob: str, value: Any) -> None:
        if knob == "method":
            if value not in METHODS:
                raise ValueError(f"unknown method (known: {', '.join(METHODS)})")
            return
        if knob != "rank":
            raise ValueError(f"unknown knob {knob!r}")
        check_rank_value(value)
        if layer is None:
            return
        target = model.get_submodule(layer)
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{layer} is a {type(target).__name__}, not a Linear")
        rank = resolve_rank(value, target.in_features, target.out_features)
        if rank is not None and not saves_cost(target.in_features, target.out_features, rank):
            limit = break_even_rank(target.in_features, target.out_features)
            raise ValueError(
                f"rank {rank} does not reduce the cost of a {target.in_features}->{target.out_features} layer "
                f"(needs rank < {limit:.1f})"
            )

    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        method = settings.options.get("method", "svd")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        plan: dict[str, int] = {}
        for layer, knobs in settings.layers.items():
            target = model.get_submodule(layer)
            if not isinstance(target, nn.Linear):
                raise ValueError(f"{layer} is a {type(target).__name__}, not a Linear to factorize")
            rank = resolve_rank(knobs.get("rank", 1.0), target.in_features, target.out_features)
            if rank is not None and saves_cost(target.in_features, target.out_features, rank):
                plan[layer] = rank
        if not plan:
            return model
        factors = {} if ctx.structure_only else self._factors(model, list(plan), method, ctx)
        for layer, rank in plan.items():
            factorize_layer(model, layer, rank, factors.get(layer))
        return model

    # --- factors, cached for the run: many trials factorize the same layer of the same model at other ranks ---

    def _factors(self, model: nn.Module, layers: list[str], method: str, ctx: ApplyContext) -> dict[str, Factors]:
        if method == "svd":
            return self._svd_factors(model, layers, ctx)
        batches: list[torch.Tensor] = []
        if method == "activation_aware":
            if ctx.calibration is None:
                raise ValueError("method activation_aware needs calibration data (none was given)")
            batches = list(ctx.calibration())
        key = (method, _fingerprint(model.state_dict().values()), _fingerprint(batches))
        store: OrderedDict = ctx.cache.setdefault("lowrank.factors", OrderedDict())
        cached: dict[str, Factors] = store.setdefault(key, {})
        store.move_to_end(key)
        while len(store) > CACHE_MODELS:
            store.popitem(last=False)
        todo = [layer for layer in layers if layer not in cached]
        if todo and method == "activation_aware":
            with _parents_calling(model, todo):
                moments = input_second_moments(model, todo, batches)
            for layer in todo:
                cached[layer] = whitened_factors(model.get_submodule(layer).weight, moments[layer])
        return {layer: cached[layer] for layer in layers}

    def _svd_factors(self, model: nn.Module, layers: list[str], ctx: ApplyContext) -> dict[str, Factors]:
        """A plain SVD depends on the layer's weight alone, so its factors are keyed by that weight's content, not
        by the whole model's: hashing DeiT-S's 88 MB of weights on every apply took ~50 ms, paid by every trial
        and by every setting the sensitivity pass scores; hashing the layers being factorized takes ~1 ms each."""
        store: OrderedDict = ctx.cache.setdefault("lowrank.svd", OrderedDict())
        out: dict[str, Factors] = {}
        for layer in layers:
            weight = model.get_submodule(layer).weight
            key = _fingerprint([weight])
            if key not in store:
                store[key] = svd_factors(weight)
            store.move_to_end(key)
            out[layer] = store[key]
        limit = CACHE_MODELS * max(len(layers), len(self.candidate_layers(model)))  # two models' worth, as above
        while len(store) > limit:
            store.popitem(last=False)
        return out


def factorize_layer(model: nn.Module, layer: str, rank: int, factors: Factors | None) -> LowRankLinear:
    """Replace the Linear ``layer`` by its rank-``rank`` factorization; with ``factors`` None, only the structure
    (right shapes, zero weights: for rebuilding a saved model before loading its state dict)."""
    dense = model.get_submodule(layer)
    if not isinstance(dense, nn.Linear):
        raise ValueError(f"{layer} is a {type(dense).__name__}, not a Linear to factorize")
    if factors is None:
        new = LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None,
                            dtype=dense.weight.dtype)
        nn.init.zeros_(new.down.weight)
        nn.init.zeros_(new.up.weight)
    else:
        up, down = factors.truncate(rank, dense.weight.dtype)
        new = LowRankLinear.from_factors(up, down, None if dense.bias is None else dense.bias.detach())
    _let_parent_call(model, layer)
    replace_module(model, layer, new)
    return new


def _bypassing_parent(model: nn.Module, layer: str) -> nn.Module | None:
    """The parent of ``layer`` when it reads ``layer.weight`` instead of calling the layer: timm's BEiT / EVA /
    Swin-V2 attention does so for ``qkv`` (to add its separate q/v biases) unless ``qkv_bias_separate`` is set."""
    parent_name, _, attr = layer.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    reads_weight = getattr(parent, "qkv_bias_separate", None) is False
    return parent if attr == "qkv" and reads_weight and getattr(parent, "q_bias", None) is not None else None


def _let_parent_call(model: nn.Module, layer: str) -> None:
    """Setting ``qkv_bias_separate`` makes the parent call the module and add the biases after it: the same sum."""
    parent = _bypassing_parent(model, layer)
    if parent is not None:
        parent.qkv_bias_separate = True


@contextmanager
def _parents_calling(model: nn.Module, layers: Iterable[str]) -> Iterator[None]:
    """For the calibration pass only: hooks see a layer's inputs only if its parent calls it."""
    parents = [p for p in (_bypassing_parent(model, layer) for layer in layers) if p is not None]
    for parent in parents:
        parent.qkv_bias_separate = True
    try:
        yield
    finally:
        for parent in parents:
            parent.qkv_bias_separate = False


def _fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A content hash, so cached factors are only reused for the very same weights and calibration data."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if t.is_quantized:
            t = t.int_repr()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
