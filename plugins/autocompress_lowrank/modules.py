"""The factorized layer: two real, smaller GEMMs in place of one.

``W (out x in) ~= up.weight (out x r) @ down.weight (r x in)``. Both factors are ordinary ``nn.Linear`` modules, so a
later stage can treat them like any other Linear (the quantization plugin converts each factor to its own format).
Only ``up`` carries the original bias. A rank-``r`` factorization costs ``r * (in + out)`` multiply-adds per token
instead of ``in * out``: it only pays when ``r < in * out / (in + out)``.
"""

from __future__ import annotations

import torch
from torch import nn


def break_even_rank(in_features: int, out_features: int) -> float:
    """The rank at which two factors cost as much (parameters and multiply-adds) as the dense layer."""
    return in_features * out_features / (in_features + out_features)


def saves_cost(in_features: int, out_features: int, rank: int) -> bool:
    return 1 <= rank < break_even_rank(in_features, out_features)


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a Linear factorized at ``rank``. Its state dict holds exactly the two factors."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """A layer computing ``x @ (up @ down).T + bias``; ``up`` is out x r, ``down`` is r x in."""
        out_features, rank = up.shape
        new = cls(down.shape[1], out_features, rank, bias is not None, dtype=up.dtype)
        with torch.no_grad():
            new.down.weight.copy_(down)
            new.up.weight.copy_(up)
            if bias is not None:
                new.up.bias.copy_(bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
