"""The distillation technique: recovery training of the compressed model (student) against the uncompressed one.

It runs in the RECOVERY stage, after structural and factorization techniques and before the final numeric format,
so quantization is applied to recovered weights. It has no per-layer knobs; its global options are searched:

- ``steps``: training steps (0: off, the identity); bounded per trial by the search space.
- ``temperature``: softmax temperature of the soft (teacher) loss.
- ``alpha``: weight of the soft loss; ``1 - alpha`` goes to the hard (label) loss.
- ``lr``: AdamW learning rate (short warm-up, then constant). 3e-4 by default: on the demo ViT 1e-3 knocked a
  mildly compressed model out of its minimum (-0.5 points after 100 steps where 3e-4 gained 1.0).
- ``feature_weight``: weight of an MSE term between the pooled pre-logit features of student and teacher (0: off).
- ``batch_size``: training batch size.
- ``patience``: stop once the validation probe has not improved at this many reports in a row, and keep the best
  weights seen (0: off, train every step). The search's final recovery (``search.finalize_steps``) uses 2.

Cost: the teacher's outputs on the training subset are computed once per run (``ctx.cache``); each trial trains only
the student. Progress is reported at steps 25, 50, 100, ... through ``ctx.report``, which may stop the trial early.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autocompress.errors import InputError
from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings

from autocompress_distillation.recovered import RecoveredStore, fingerprint
from autocompress_distillation.teacher import teacher_targets
from autocompress_distillation.train import DistillSettings, distill

MAX_STEPS = 100_000


class DistillationTechnique(Technique):
    name = "distillation"
    stage = Stage.RECOVERY
    layer_knobs: dict[str, Any] = {}
    #: identities first: ``steps: 0`` leaves the model unchanged; the other values are the defaults used when a
    #: policy leaves an option out.
    global_knobs = {
        "steps": 0,
        "temperature": 2.0,
        "alpha": 0.5,
        "lr": 3e-4,
        "feature_weight": 0.0,
        "batch_size": 128,
        "patience": 0,
    }
    #: the final recovery: stop after this many reports without a better validation probe, keep the best weights
    FINALIZE_PATIENCE = 2

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return []  # acts on the whole model

    def check_value(self, model: nn.Module, layer: str | None, knob: str, value: Any) -> None:
        if layer is not None:
            raise ValueError("distillation has no per-layer settings")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        if knob == "patience":
            if int(value) != value or value < 0:
                raise ValueError("must be a whole number, 0 or more")
        elif knob in ("steps", "batch_size"):
            if int(value) != value:
                raise ValueError("must be a whole number")
            low = 0 if knob == "steps" else 1
            if not low <= value <= MAX_STEPS:
                raise ValueError(f"must be between {low} and {MAX_STEPS}")
        elif knob in ("temperature", "lr") and not value > 0:
            raise ValueError("must be greater than 0")
        elif knob == "alpha" and not 0 <= value <= 1:
            raise ValueError("must be between 0 and 1")
        elif knob == "feature_weight" and not value >= 0:
            raise ValueError("must be 0 or more")

    def settings(self, options: dict[str, Any]) -> DistillSettings:
        merged = {**self.global_knobs, **options}
        return DistillSettings(
            steps=int(merged["steps"]), temperature=float(merged["temperature"]), alpha=float(merged["alpha"]),
            lr=float(merged["lr"]), feature_weight=float(merged["feature_weight"]),
            batch_size=int(merged["batch_size"]), patience=int(merged["patience"]),
        )

    def finalize_options(self, options: dict[str, Any], steps: int) -> dict[str, Any]:
        return {**options, "steps": int(steps), "patience": self.FINALIZE_PATIENCE}

    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        opts = self.settings(settings.options)
        if opts.steps == 0 or ctx.structure_only:  # training never changes the structure
            return model
        if ctx.teacher is None or ctx.train_data is None:
            raise InputError(
                "policy.techniques.distillation.options.steps",
                "distillation trains the model and needs a teacher and training data (compress through a run "
                "config, or rebuild a saved model with structure_only=True)",
            )
        images, labels = ctx.train_data
        store = RecoveredStore.for_run(ctx.cache, ctx.teacher, images)
        key = f"{fingerprint(model)}|{opts}|seed={ctx.seed}"
        trained = store.get(key)
        if trained is not None:
            model.load_state_dict(trained, strict=True)
            return model
        targets = teacher_targets(ctx.teacher, images, ctx.cache, with_features=opts.feature_weight > 0)
        distill(model, targets, images, labels, opts, seed=ctx.seed, evaluate=ctx.evaluate, report=ctx.report,
                check_deadline=getattr(ctx, "check_deadline", None))
        store.put(key, model)
        return model
