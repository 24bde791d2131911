"""The score the search maximizes on the validation split (and reports on the test split at the end).

Accuracy of a classifier is the builtin. A user with another task passes their own evaluator to
``autocompress.search(..., metric=fn)``: ``fn(model, split) -> float``, higher is better, where ``split`` is the data
the search scores on (``split.images``, ``split.labels``; the validation split during the search and for the final
recovery, the test split at the end). The techniques do not care what is measured; the trial records keep the
score in ``val_accuracy`` / ``test_accuracy`` and ``baseline.yaml`` names the metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from autocompress.errors import TechniqueError
from autocompress.evaluate import accuracy

__all__ = ["ACCURACY", "Metric"]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[nn.Module, Any], float]

    def __call__(self, model: nn.Module, split: Any, require_finite: bool = False) -> float:
        """The score of ``model`` on ``split``; with ``require_finite``, a score that is not a number fails the
        trial (a broken compressed model must not rank)."""
        model.eval()
        if self.fn is accuracy:  # checks the logits themselves: NaN logits still argmax to a number
            return accuracy(model, split, require_finite=require_finite)
        value = float(self.fn(model, split))
        if require_finite and not math.isfinite(value):
            raise TechniqueError(f"the metric {self.name!r} is not a number ({value})")
        return value

    @classmethod
    def of(cls, metric: "Metric | Callable[[nn.Module, Any], float] | None") -> "Metric":
        if metric is None:
            return ACCURACY
        if isinstance(metric, Metric):
            return metric
        if not callable(metric):
            from autocompress.errors import InputError

            raise InputError("metric", f"must be a function (model, split) -> float, got {type(metric).__name__}")
        return cls(getattr(metric, "__name__", "metric"), metric)


ACCURACY = Metric("accuracy", accuracy)
