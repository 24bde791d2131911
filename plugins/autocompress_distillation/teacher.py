"""Teacher targets for the recovery-training subset: computed once per run and shared by every trial.

The teacher (the uncompressed model) and the training subset do not change during a run, so the teacher's logits
(and, for the feature term, its pooled pre-logit features) are a pure function of the two. The first trial that
distills computes them and leaves them in ``ApplyContext.cache``, which lives as long as the run: later trials pay
only for the student's forward and backward passes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CACHE_KEY = "distillation.teacher_targets"
BATCH = 500


@dataclass(frozen=True)
class TeacherTargets:
    logits: torch.Tensor  # N x classes, float32
    features: torch.Tensor | None  # N x D pooled pre-logit features; None until the feature term asks for them


def split_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled pre-logit features, logits)`` of a timm model, from one forward pass."""
    if not all(hasattr(model, a) for a in ("forward_features", "forward_head")):
        raise ValueError(
            f"the feature term needs a timm model (forward_features/forward_head); got {type(model).__name__}"
        )
    tokens = model.forward_features(images)
    # the head is applied by the model itself: some models have several (distilled DeiT averages two)
    return model.forward_head(tokens, pre_logits=True), model.forward_head(tokens)


def compute_teacher_outputs(
    teacher: nn.Module, images: torch.Tensor, with_features: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass of the teacher over ``images`` (in batches): logits, and pooled features when asked."""
    was_training = teacher.training
    teacher.eval()
    logits, features = [], []
    try:
        with torch.no_grad():  # not inference_mode: the targets are later used next to autograd tensors
            for start in range(0, len(images), BATCH):
                batch = images[start : start + BATCH]
                if with_features:
                    pooled, out = split_forward(teacher, batch)
                    features.append(pooled.float())
                else:
                    out = teacher(batch)
                logits.append(out.float())
    finally:
        teacher.train(was_training)
    return torch.cat(logits), (torch.cat(features) if with_features else None)


def teacher_targets(
    teacher: nn.Module, images: torch.Tensor, cache: dict[str, Any], with_features: bool = False
) -> TeacherTargets:
    """The teacher's outputs on ``images``, from ``cache`` when this run already computed them."""
    data_key = (images.data_ptr(), tuple(images.shape))
    entry = cache.get(CACHE_KEY)
    if entry is not None:
        teacher_ref, cached_key, targets = entry
        if teacher_ref() is teacher and cached_key == data_key and (targets.features is not None or not with_features):
            return targets
    logits, features = compute_teacher_outputs(teacher, images, with_features)
    targets = TeacherTargets(logits=logits, features=features)
    cache[CACHE_KEY] = (weakref.ref(teacher), data_key, targets)  # a weak reference: the cache never keeps a model alive
    return targets
