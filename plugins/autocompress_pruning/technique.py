"""The pruning technique: per transformer block, how many attention heads and how much MLP width to keep.

Candidate layers are the blocks whose attention or MLP is of a kind ``surgery.py`` knows (timm's standard
``Attention``/``Mlp``, BEiT's and EVA-02's attention, ``SwiGLU``, ``GluMlp``); each knob is checked on its own, so a
block with a supported MLP but an unsupported attention still offers ``mlp``.

Knobs are fractions, so one search space fits models with any head count and width, and "keep everything" is the
same value (1.0) for every model and block. A fraction becomes a count by rounding to the nearest integer (halves
up): with 3 heads, 0.67 keeps 2 and 0.34 keeps 1; with 6 heads, 0.5 keeps 3. ``0`` removes the whole branch (all
heads: the attention; all channels: the MLP), leaving the bias it added (``surgery.remove_branch``); a fraction above
0 that would keep nothing is rejected. The units removed are the least important by the ``criterion`` option (see
``importance.py``).

With ``ctx.structure_only`` the first heads/channels are kept without scoring: only the shapes matter there (a saved
model's weights are loaded right after), so no data or weight statistics are needed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings

from autocompress_pruning.importance import (
    CRITERIA,
    DATA_DRIVEN,
    BlockScores,
    random_scores,
    taylor_scores,
    top_indices,
    weight_scores,
)
from autocompress_pruning.surgery import (
    attention_adapter,
    attention_problem,
    mlp_adapter,
    mlp_problem,
    prune_heads,
    prune_mlp,
    removal_problem,
    remove_branch,
)

_CACHE_KEY = "pruning.taylor_scores"


def kept_count(total: int, fraction: float) -> int:
    """How many of ``total`` units a fraction keeps: nearest integer, halves rounded up."""
    return int(math.floor(total * float(fraction) + 0.5 + 1e-9))


class PruningTechnique(Technique):
    name = "pruning"
    stage = Stage.STRUCTURE
    layer_knobs = {"heads": 1.0, "mlp": 1.0}
    global_knobs = {"criterion": "l1"}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return [
            name for name, module in model.named_modules()
            if name and (attention_problem(module) is None or mlp_problem(module) is None)
        ]

    def check_value(self, model: nn.Module, layer: str | None, knob: str, value: Any) -> None:
        if layer is None:
            if knob == "criterion" and (not isinstance(value, str) or value not in CRITERIA):
                raise ValueError(f"unknown criterion (known: {', '.join(CRITERIA)})")
            return
        self._planned_count(model.get_submodule(layer), knob, value)

    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        criterion = settings.options.get("criterion", self.global_knobs["criterion"])
        self.check_value(model, None, "criterion", criterion)
        plan: dict[str, tuple[int | None, int | None]] = {}  # block -> (heads to keep, channels to keep); None: all
        for layer, knobs in settings.layers.items():
            unknown = set(knobs) - set(self.layer_knobs)
            if unknown:
                raise ValueError(f"{layer}: unknown knob {sorted(unknown)[0]!r} (known: heads, mlp)")
            block = model.get_submodule(layer)
            heads = self._planned_count(block, "heads", knobs.get("heads", 1.0))
            channels = self._planned_count(block, "mlp", knobs.get("mlp", 1.0))
            if heads is not None or channels is not None:
                plan[layer] = (heads, channels)
        if not plan:
            return model

        # a branch removed whole needs no scores: nothing of it is kept
        scored = {layer: (h or None, c or None) for layer, (h, c) in plan.items() if h or c}
        scores = self._scores(model, scored, criterion, ctx) if scored else {}
        for layer, (heads, channels) in plan.items():
            block = model.get_submodule(layer)
            if heads == 0:
                remove_branch(block, "attn")
            elif heads is not None:
                s = scores[layer].heads
                prune_heads(block.attn, range(heads) if s is None else top_indices(s, heads))
            if channels == 0:
                remove_branch(block, "mlp")
            elif channels is not None:
                s = scores[layer].channels
                prune_mlp(block.mlp, range(channels) if s is None else top_indices(s, channels))
        return model

    # --- helpers ------------------------------------------------------------------------------------------------

    def _planned_count(self, block: nn.Module, knob: str, value: Any) -> int | None:
        """Units to keep for ``knob`` (None: keep all; 0: remove the branch); ``ValueError`` when the value cannot be
        applied."""
        if knob not in self.layer_knobs:
            raise ValueError(f"unknown knob (known: {', '.join(self.layer_knobs)})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{knob} is the fraction to keep, a number in (0, 1] (1.0 keeps everything), or 0 to "
                             f"remove the {'attention' if knob == 'heads' else 'MLP'}")
        if float(value) == 0.0:
            problem = removal_problem(block, "attn" if knob == "heads" else "mlp")
            if problem:
                raise ValueError(problem)
            return 0
        if knob == "heads":
            problem = attention_problem(block)
            total = None if problem else attention_adapter(block.attn).heads(block.attn)
            unit = "heads"
        else:
            problem = mlp_problem(block)
            total = None if problem else mlp_adapter(block.mlp).width(block.mlp)
            unit = "MLP channels"
        if float(value) == 1.0:
            return None
        if problem:
            raise ValueError(problem)
        keep = kept_count(total, value)
        if keep < 1:
            raise ValueError(f"keeps 0 of {total} {unit} (the smallest fraction here is {0.5 / total:.3g})")
        return None if keep >= total else keep

    def _scores(
        self, model: nn.Module, plan: dict[str, tuple[int | None, int | None]], criterion: str, ctx: ApplyContext
    ) -> dict[str, BlockScores]:
        if ctx.structure_only:
            return {layer: BlockScores() for layer in plan}
        wanted = {layer: (h is not None, c is not None) for layer, (h, c) in plan.items()}
        if criterion in ("l1", "l2"):
            p = 1 if criterion == "l1" else 2
            return {layer: weight_scores(model.get_submodule(layer), *w, p=p) for layer, w in wanted.items()}
        if criterion == "random":
            generator = torch.Generator().manual_seed(ctx.seed)
            return {layer: random_scores(model.get_submodule(layer), *w, generator) for layer, w in wanted.items()}
        assert criterion in DATA_DRIVEN
        if ctx.calibration is None:
            raise ValueError(f"criterion {criterion!r} needs calibration images (ApplyContext.calibration)")
        # The scores depend only on the unpruned model, so one data pass serves every trial of a run.
        key = (_CACHE_KEY, _fingerprint(model))
        cached = ctx.cache.get(key)
        if cached is None:
            every = {name: (attention_problem(m) is None, mlp_problem(m) is None)
                     for name in self.candidate_layers(model) for m in [model.get_submodule(name)]}
            cached = taylor_scores(model, every, ctx.calibration, between_batches=ctx.check_deadline)
            ctx.cache[key] = cached
        return {layer: BlockScores(cached[layer].heads if h else None, cached[layer].channels if c else None)
                for layer, (h, c) in wanted.items()}


def _fingerprint(model: nn.Module) -> tuple:
    """Identifies the unpruned weights cheaply, so cached scores are never used for another model."""
    with torch.no_grad():
        return tuple((name, tuple(p.shape), float(p.detach().float().sum())) for name, p in model.named_parameters())
