"""Physically remove attention heads and MLP hidden channels from timm ViT blocks.

Only timm's standard ``Attention`` (``timm.layers.Attention``: fused ``qkv``, ``proj``, ``num_heads``, ``head_dim``,
``attn_dim``) and ``Mlp`` (``fc1`` -> act -> ``norm`` -> ``fc2``) are touched, because their forward is known: after
surgery timm's own forward runs on smaller ``nn.Linear`` layers, so later techniques (low rank, quantization) see
plain Linears of the new shapes. What changes:

- heads: the q, k and v rows of each removed head in ``qkv`` (and in the optional ``gate``), its columns in
  ``proj``, its slice of the optional ``norm`` over the attention width; ``num_heads`` and ``attn_dim``.
  ``head_dim``, ``scale`` and ``q_norm``/``k_norm`` (which act on one head's width) stay as they are.
- MLP channels: the rows of ``fc1``, the columns of ``fc2`` and the slice of the optional hidden ``norm``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

try:  # timm is a core dependency; the import is guarded only so the reason is clear if it moves
    from timm.layers import Attention as TimmAttention
    from timm.layers import Mlp as TimmMlp
except ImportError:  # pragma: no cover
    TimmAttention = TimmMlp = None  # type: ignore[assignment,misc]


def attention_problem(block: nn.Module) -> str | None:
    """Why the heads of ``block`` cannot be pruned, or None when they can."""
    attn = getattr(block, "attn", None)
    if attn is None or TimmAttention is None or type(attn) is not TimmAttention:
        return f"attention is {type(attn).__name__}, not timm's standard Attention"
    if not hasattr(attn, "attn_dim"):  # older timm reshapes by the embedding width, which breaks once heads go
        return "this timm version's Attention has no 'attn_dim'; head pruning needs timm >= 1.0.20"
    if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        return "qkv/proj are no longer plain Linear layers (pruning must run before other techniques)"
    gate = getattr(attn, "gate", None)
    if gate is not None and not isinstance(gate, nn.Linear):
        return "the attention gate is not a Linear layer"
    if not isinstance(attn.norm, (nn.Identity, nn.LayerNorm)):
        return f"the attention output norm is a {type(attn.norm).__name__}, not a LayerNorm"
    return None


def mlp_problem(block: nn.Module) -> str | None:
    """Why the MLP of ``block`` cannot be narrowed, or None when it can."""
    mlp = getattr(block, "mlp", None)
    if mlp is None or TimmMlp is None or type(mlp) is not TimmMlp:
        return f"MLP is {type(mlp).__name__}, not timm's standard Mlp"
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return "fc1/fc2 are no longer plain Linear layers (pruning must run before other techniques)"
    if not isinstance(mlp.norm, (nn.Identity, nn.LayerNorm)):
        return f"the MLP hidden norm is a {type(mlp.norm).__name__}, not a LayerNorm"
    return None


def head_counts(model: nn.Module) -> dict[str, int]:
    """``{block name: attention heads}`` for every block with timm's standard Attention (also after later
    techniques replaced its Linear layers)."""
    return {name: m.attn.num_heads for name, m in model.named_modules()
            if TimmAttention is not None and type(getattr(m, "attn", None)) is TimmAttention}


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """``{block name: MLP hidden width}`` for every block with timm's standard Mlp (read from ``fc2``'s input width,
    which low-rank and quantized replacements keep as ``in_features``)."""
    return {name: int(m.mlp.fc2.in_features) for name, m in model.named_modules()
            if TimmMlp is not None and type(getattr(m, "mlp", None)) is TimmMlp
            and isinstance(getattr(m.mlp.fc2, "in_features", None), int)}


def prune_heads(attn: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the heads ``keep`` (indices into the current heads) of a timm ``Attention``, in place."""
    heads, head_dim = attn.num_heads, attn.head_dim
    idx = _indices(keep, heads, "head")
    within = torch.arange(head_dim)
    per_head = (idx[:, None] * head_dim + within).reshape(-1)  # attention-width positions of the kept heads
    width = heads * head_dim
    qkv_rows = torch.cat([part * width + per_head for part in range(3)])  # qkv rows are laid out (q|k|v, head, dim)
    _keep_rows(attn.qkv, qkv_rows)
    if getattr(attn, "gate", None) is not None:
        _keep_rows(attn.gate, per_head)
    _keep_columns(attn.proj, per_head)
    if isinstance(attn.norm, nn.LayerNorm):
        _keep_norm(attn.norm, per_head)
    attn.num_heads = len(idx)
    attn.attn_dim = len(idx) * head_dim


def prune_mlp(mlp: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the hidden channels ``keep`` of a timm ``Mlp``, in place."""
    idx = _indices(keep, mlp.fc1.out_features, "channel")
    _keep_rows(mlp.fc1, idx)
    _keep_columns(mlp.fc2, idx)
    if isinstance(mlp.norm, nn.LayerNorm):
        _keep_norm(mlp.norm, idx)


def _indices(keep: Sequence[int], total: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(sorted({int(i) for i in keep}), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError(f"cannot remove every {what}")
    if idx[0] < 0 or idx[-1] >= total:
        raise ValueError(f"{what} index out of range 0..{total - 1}")
    return idx


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = _param(linear.weight[rows], linear.weight)
    if linear.bias is not None:
        linear.bias = _param(linear.bias[rows], linear.bias)
    linear.out_features = int(rows.numel())


def _keep_columns(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = _param(linear.weight[:, cols], linear.weight)
    linear.in_features = int(cols.numel())


def _keep_norm(norm: nn.LayerNorm, idx: torch.Tensor) -> None:
    if norm.weight is not None:
        norm.weight = _param(norm.weight[idx], norm.weight)
    if norm.bias is not None:
        norm.bias = _param(norm.bias[idx], norm.bias)
    norm.normalized_shape = (int(idx.numel()),)
