"""The contract between the core and a technique plugin.

A technique says which layers of a model it can act on (by module name), which settings it offers per layer and
globally, and applies a policy's settings to a model. The core never looks inside: it only orders techniques by
stage, so they compose (structure -> factorization -> recovery training -> numeric format).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn


class Stage(enum.IntEnum):
    """When a technique runs; lower runs first."""

    STRUCTURE = 10  # pruning, token merging: change shapes / the computation graph
    FACTORIZATION = 20  # low-rank: replace one GEMM by two smaller ones
    RECOVERY = 30  # distillation: train the compressed weights back
    FORMAT = 40  # quantization: numeric format of the final weights


class TrialStopped(Exception):
    """Raised by a technique when ``ctx.report`` says the search wants this trial stopped early (its intermediate
    score is poor). The runner records the trial as PRUNED with the reason; it lives here so that plugins need not
    import the runner."""


@dataclass
class TechniqueSettings:
    """One technique's part of a policy: per-layer knob values keyed by module name, plus global options."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.layers and not self.options


@dataclass
class ApplyContext:
    """What a technique may use while compressing one model.

    ``structure_only`` asks for the right structure and kernels without data-dependent or training work (used to
    rebuild a saved model before loading its weights, and for cheap cost checks). ``cache`` lives for a whole run
    (e.g. teacher outputs) and is shared by all trials. ``report`` passes an intermediate validation score to the
    search (step, value) and returns True when the trial should stop early; the technique then raises
    :class:`TrialStopped`.
    """

    structure_only: bool = False
    seed: int = 0
    calibration: Callable[[], Iterator[torch.Tensor]] | None = None
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None
    teacher: nn.Module | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    report: Callable[[int, float], bool] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def check_deadline(self) -> None:
        """Raise :class:`autocompress.timelimit.TrialTimeout` once the trial is past ``search.trial_timeout_s``.

        Long loops (training steps, calibration batches) call this between steps: in a worker thread (Ray) it is
        the only way a trial's time bound can stop them; in the main thread a timer also stops them without it.
        """
        from autocompress.timelimit import check_deadline

        check_deadline()


class Technique(ABC):
    """Base class of compression techniques.

    Subclasses set ``name``, ``stage``, and the identity value of each knob: applying a technique with every knob at
    its identity must leave the model's outputs unchanged.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    #: per-layer knob name -> the value that leaves the layer unchanged
    layer_knobs: ClassVar[Mapping[str, Any]] = {}
    #: global knob name -> the value that leaves the model unchanged
    global_knobs: ClassVar[Mapping[str, Any]] = {}

    @abstractmethod
    def candidate_layers(self, model: nn.Module) -> list[str]:
        """Module names this technique can act on in ``model``, in model order."""

    def check_value(self, model: nn.Module, layer: str | None, knob: str, value: Any) -> None:
        """Raise ``ValueError`` (a short reason) if ``value`` cannot be applied to ``layer`` (None: global)."""

    @abstractmethod
    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        """Compress ``model`` (in place or not) with ``settings``; return the model to use from then on."""

    def finalize_options(self, options: Mapping[str, Any], steps: int) -> dict[str, Any] | None:
        """For a recovery technique: its global options for the longer recovery the search gives the policy it
        chose (``search.finalize_steps`` steps, early stopped on the validation probe), starting from the options
        the search chose (empty when it chose none). None (the default): the technique has no such thing."""
        return None

    def simulated_layers(self, settings: TechniqueSettings) -> list[str]:
        """Layers whose setting has no real kernel here: they count for memory but never claim speed."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} stage={self.stage.name}>"


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it hangs, for replacing a submodule."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` was."""
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, new)
