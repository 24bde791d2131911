"""Truncated factorizations of a weight matrix: plain SVD, and activation-aware SVD that weighs input directions
by how much the layer's real inputs use them.

Plain SVD minimizes ``||W - W'||_F``, treating every input direction alike. But a ViT's activations are far from
isotropic (a few channels carry most of the energy), so what matters is the output error ``||(W - W') X||_F`` on
real inputs ``X``. With the input second moment ``C = X^T X / n = S S^T``, that error is ``||(W - W') S||_F``, so the
best rank-r ``W'`` is the truncated SVD of ``W S`` mapped back by ``S^-1`` (whitening, as in SVD-LLM; ASVD's
diagonal scaling is the cheap special case). Both return *full* ordered factors, so any rank is a slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocompress.costs import num_threads

#: eigenvalues of the input second moment are floored at this fraction of their mean, so directions the
#: calibration data never visits keep a little weight and ``S`` stays invertible
DAMPING = 1e-4
#: LAPACK's SVD / eigh at ViT layer sizes (64..1536) measured faster on one thread than on two (less sync)
LAPACK_THREADS = 1


@dataclass(frozen=True)
class Factors:
    """``W' = up[:, :r] @ down[:r]`` for every rank ``r`` up to the full rank; singular values split evenly
    between the factors (sqrt on each side) so both have similar ranges, which keeps them easy to quantize."""

    up: torch.Tensor  # out x k
    down: torch.Tensor  # k x in
    singular_values: torch.Tensor  # k, descending

    @property
    def full_rank(self) -> int:
        return int(self.singular_values.numel())

    def truncate(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank {rank} outside 1..{self.full_rank}")
        return self.up[:, :rank].to(dtype).contiguous(), self.down[:rank].to(dtype).contiguous()


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> Factors:
    root = s.sqrt()
    return Factors(up=(u * root).float(), down=(root[:, None] * vh).float(), singular_values=s.float())


def svd_factors(weight: torch.Tensor) -> Factors:
    """Plain truncated-SVD factors of ``weight`` (out x in)."""
    with num_threads(LAPACK_THREADS):
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return _split(u, s, vh)


def whitened_factors(weight: torch.Tensor, second_moment: torch.Tensor, damping: float = DAMPING) -> Factors:
    """Factors minimizing the output error on inputs whose second moment ``E[x x^T]`` is ``second_moment``."""
    w = weight.detach().double()
    c = second_moment.double()
    c = (c + c.T) / 2
    with num_threads(LAPACK_THREADS):
        evals, evecs = torch.linalg.eigh(c)
        floor = max(float(evals.clamp_min(0).mean()) * damping, 1e-12)
        root = evals.clamp_min(floor).sqrt()
        u, s, vh = torch.linalg.svd(w @ (evecs * root), full_matrices=False)  # W S with S = Q diag(sqrt(e))
    return _split(u, s, (vh / root) @ evecs.T)  # Vh S^-1 with S^-1 = diag(1/sqrt(e)) Q^T


def input_second_moments(
    model: torch.nn.Module, layers: list[str], batches
) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of the inputs each named Linear sees while ``model`` runs on ``batches`` (one pass)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            gram = (x.T @ x).double()
            sums[name] = sums[name] + gram if name in sums else gram
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name in layers if name not in counts]
    if missing:
        raise ValueError(f"calibration never reached {missing[0]} (no calibration batches, or the layer is unused)")
    return {name: sums[name] / counts[name] for name in layers}
