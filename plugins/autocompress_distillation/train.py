"""The recovery-training loop: a bounded number of steps of the student against the teacher's cached outputs.

Loss = ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, label) + feature_weight * MSE(pooled
features)``, the soft term at temperature ``T`` as in Hinton et al. The learning rate warms up briefly and then stays
constant, so a student's validation score after ``s`` steps does not depend on how many steps the trial will take in
all: scores at the same step are comparable across trials, which is what early stopping compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.technique import TrialStopped

from autocompress_distillation.teacher import TeacherTargets, split_forward

#: the first step at which the validation probe is reported; later reports double (25, 50, 100, ...) and the last
#: step is always reported. Geometric steps are the rungs successive halving / Hyperband compare at.
FIRST_REPORT = 25
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    temperature: float
    alpha: float  # weight of the soft (teacher) loss; 1 - alpha goes to the hard (label) loss
    lr: float
    feature_weight: float  # weight of the pooled-feature MSE term (0: off)
    batch_size: int
    patience: int = 0  # reports without a better probe before stopping (keeping the best weights); 0: off


def report_steps(total: int) -> list[int]:
    """Steps after which the validation probe is reported: 25, 50, 100, ... below ``total``, then ``total``."""
    steps, step = [], FIRST_REPORT
    while step < total:
        steps.append(step)
        step *= 2
    return steps + [total] if total > 0 else []


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    loss = student_logits.new_zeros(())
    if alpha > 0:
        soft = F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        loss = loss + alpha * temperature**2 * soft
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


def distill(
    student: nn.Module,
    targets: TeacherTargets,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: DistillSettings,
    seed: int,
    evaluate: Callable[[nn.Module], float] | None = None,
    report: Callable[[int, float], bool] | None = None,
    check_deadline: Callable[[], None] | None = None,
) -> dict[int, float]:
    """Train ``student`` in place; returns the validation probe at each reported step.

    Raises :class:`TrialStopped` when ``report`` says the trial should stop and steps remain. Weights that are
    exactly zero before training (pruned entries) stay zero, so recovery never undoes a structural decision. With
    ``settings.patience`` (and ``evaluate``), training ends once the probe has not improved at that many reports in
    a row, and the student keeps the weights of its best probe (the untrained student's probe counts too).
    """
    params = [p for p in student.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError("the student has no floating-point parameters to train")
    requires = [p.requires_grad for p in params]
    zero_masks = [(p, p.detach() != 0) for p in params if p.dim() >= 2 and bool((p.detach() == 0).any())]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warmup = max(1, min(10, settings.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    batch = min(settings.batch_size, n)
    order, cursor = torch.randperm(n, generator=gen), 0
    checkpoints = set(report_steps(settings.steps))
    probes: dict[int, float] = {}
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    if settings.patience > 0 and evaluate is not None:
        best = (float(evaluate(student)), _state(student))
    stale = 0
    for p in params:
        p.requires_grad_(True)
    student.train()
    try:
        for step in range(1, settings.steps + 1):
            if check_deadline is not None:
                check_deadline()  # the search's per-trial time bound
            if cursor + batch > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            x = images[idx]
            if settings.feature_weight > 0:
                pooled, out = split_forward(student, x)
                if pooled.shape != targets.features[idx].shape:
                    raise ValueError(
                        f"the feature term needs equal feature widths (student {tuple(pooled.shape[1:])}, "
                        f"teacher {tuple(targets.features.shape[1:])})"
                    )
            else:
                out = student(x)
            loss = distillation_loss(out, targets.logits[idx], labels[idx], settings.temperature, settings.alpha)
            if settings.feature_weight > 0:
                loss = loss + settings.feature_weight * F.mse_loss(pooled, targets.features[idx])
            if not torch.isfinite(loss):
                raise ValueError(f"the distillation loss is not finite at step {step} (lr {settings.lr} too high?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            sched.step()
            if zero_masks:
                with torch.no_grad():
                    for p, keep in zero_masks:
                        p.mul_(keep)
            if step in checkpoints and evaluate is not None:
                value = float(evaluate(student))
                student.train()
                probes[step] = value
                if report is not None and report(step, value) and step < settings.steps:
                    raise TrialStopped(f"step {step} of {settings.steps}: validation probe {value:.4f}")
                if best is not None:
                    if value > best[0]:
                        best, stale = (value, _state(student)), 0
                    else:
                        stale += 1
                        if stale >= settings.patience:
                            break
        if best is not None:
            student.load_state_dict(best[1])
    finally:
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
        student.eval()
    return probes


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
