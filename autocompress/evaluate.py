"""Accuracy of a model on an in-memory split."""

from __future__ import annotations

import torch
from torch import nn

from autocompress.data import Split
from autocompress.errors import TechniqueError


def accuracy(model: nn.Module, split: Split, batch_size: int = 500, require_finite: bool = False) -> float:
    """Top-1 accuracy. With ``require_finite``, NaN or infinite logits raise :class:`TechniqueError` instead of
    being argmax-ed into a meaningless score (a broken compressed model must fail its trial, not rank)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            logits = model(split.images[start : start + batch_size])
            if require_finite and not bool(torch.isfinite(logits).all()):
                raise TechniqueError("the compressed model outputs NaN or infinite values (accuracy undefined)")
            correct += int((logits.argmax(-1) == split.labels[start : start + batch_size]).sum())
    return correct / max(1, len(split))


def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])
