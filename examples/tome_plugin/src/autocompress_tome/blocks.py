"""A timm ViT block that merges tokens between its attention and its MLP, with proportional attention.

:class:`TokenMergingBlock` adopts the submodules of a ``timm.models.vision_transformer.Block`` under the same names
(``norm1``, ``attn``, ``attn.qkv``, ``mlp.fc1`` ...), so the state dict, the module names other techniques address
(``blocks.3.attn.qkv``) and any later replacement of those submodules (low rank, quantization) keep working. Only the
block's forward changes:

    x = x + attention(norm1(x), bias = log(size))     # proportional attention once tokens carry sizes
    x = merge r tokens of x (keys of that attention)    # bipartite soft matching, protected prefix tokens kept
    x = x + mlp(norm2(x))                               # on N - r tokens

The blocks of one model share a :class:`~autocompress_tome.merge.TokenState`; the first merging block resets it at
the start of every forward pass. When the model pools over tokens (average pooling), the last block lays the tokens
out on the input grid again, so the pool weighs each merged token by the patches it stands for; a model that reads
its class token skips that, and ``forward_features`` then returns the merged tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autocompress_tome.merge import TokenState

#: what an attention module must expose for :func:`attend` to run it
ATTENTION_PARTS = ("qkv", "num_heads", "proj")


def attend(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
           want_keys: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a timm ``Attention``'s own layers with an additive key bias; return (output, keys averaged over heads,
    or None unless ``want_keys``).

    Mirrors the computation of ``timm.layers.Attention.forward`` (qkv projection, optional q/k norm, scaled dot
    product, optional output norm and gate, projection), reading the head count from the module and the head width
    from the projection's output, so a pruned attention with fewer heads runs too.
    """
    batch, n, _ = x.shape
    heads = int(attn.num_heads)
    qkv = attn.qkv(x)
    head_dim = qkv.shape[-1] // (3 * heads)
    q, k, v = qkv.reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    drop = getattr(attn, "attn_drop", None)
    p = drop.p if (drop is not None and attn.training) else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    out = out.transpose(1, 2).reshape(batch, n, heads * head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj(out)
    proj_drop = getattr(attn, "proj_drop", None)
    if proj_drop is not None:
        out = proj_drop(out)
    return out, (k.mean(dim=1) if want_keys else None)


class TokenMergingBlock(nn.Module):
    """A pre-norm ViT block that merges ``r`` tokens after its attention (see the module docstring)."""

    #: the submodules of timm's Block this block takes over, under the same names
    PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: nn.Module, r: int, protected: int, state: TokenState, first: bool, last: bool,
                 unmerge: bool = True) -> None:
        super().__init__()
        for part in self.PARTS:
            self.add_module(part, getattr(block, part))
        self.r = int(r)
        self.protected = int(protected)
        self.first = first
        self.last = last
        self.unmerge = unmerge  # lay tokens out on the input grid after the last block (models that pool over tokens)
        self._state = state  # a plain object: shared by the model's merging blocks, not part of the state dict

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("token merging does not support attention masks")
        state = self._state
        if self.first:
            state.reset()
        y, keys = attend(self.attn, self.norm1(x), state.attention_bias(x.dtype), want_keys=self.r > 0)
        x = x + self.drop_path1(self.ls1(y))
        if self.r:
            x = state.merge(x, keys, self.r, self.protected)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.last:
            if self.unmerge:
                x = state.unmerge(x)
            state.reset()  # drop the per-batch tensors
        return x

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.protected}" + (", unmerge" if self.last and self.unmerge else "")
