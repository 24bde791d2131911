"""Physically remove attention heads and MLP hidden channels from timm ViT-family blocks.

A block is prunable when its ``attn`` / ``mlp`` is of a kind whose forward is known. Each kind has an adapter,
looked up by the module's exact type (a subclass may compute differently), that knows where a head's or a channel's
weights are. After surgery the layers are plain ``nn.Linear`` of the new shapes, so later techniques (low rank,
quantization) see ordinary Linears, and ``head_counts`` / ``mlp_widths`` read the new sizes even after those
techniques replaced the Linears.

Attention kinds (a head's rows in every q, k and v projection, its columns in ``proj``, its slice of every per-head
vector; ``head_dim``, ``scale``, ``q_norm``/``k_norm`` and rotary embeddings act within one head, so they stay):

- ``timm.layers.Attention`` (ViT, DeiT, ...): fused ``qkv`` (and its bias), the optional ``gate``, the optional
  ``norm`` over the attention width; ``num_heads`` and ``attn_dim`` (its forward reshapes by ``attn_dim``, so timm's
  own forward keeps running).
- ``timm.models.beit.Attention`` (BEiT): fused ``qkv`` without bias plus the separate ``q_bias`` / ``v_bias``
  parameters and the zero ``k_bias`` buffer, the head's column of ``relative_position_bias_table``; ``num_heads``.
- ``timm.models.eva.EvaAttention`` (EVA-02): fused ``qkv`` with ``q_bias``/``k_bias``/``v_bias``, or separate
  ``q_proj``/``k_proj``/``v_proj`` with their own biases; the optional ``gate`` and sub-LN ``norm`` over the
  attention width; ``num_heads``. The rotary embedding is computed per head width and shared by all heads.

BEiT's and EVA's forwards reshape the joined head outputs to the width of their *input* (``reshape(B, N, C)``),
which only holds while every head is there. A pruned one therefore becomes :class:`PrunedBeitAttention` /
:class:`PrunedEvaAttention`: the same class with a forward that takes the width from the heads left. BEiT's
model-level shared relative position bias has one slice per original head, so a pruned BEiT attention keeps the
original indices of its heads in the ``head_index`` buffer (saved with the weights, because which heads survive
depends on their scores).

MLP kinds (a channel's row in every input Linear, its column in ``fc2``, its slice of the optional hidden ``norm``):

- ``timm.layers.Mlp``: ``fc1`` -> act -> ``norm`` -> ``fc2``.
- ``timm.layers.SwiGLU``: ``fc1_g`` and ``fc1_x`` rows of the channel together.
- ``timm.layers.GluMlp`` (EVA-02's packed SwiGLU): ``fc1`` holds both halves that the forward chunks apart, so a
  channel's row is removed from each half and the halves stay aligned.

Every head or every channel can go too (:func:`remove_branch`): the branch's output is then the bias of its last
Linear (``proj`` / ``fc2``) for every token, so the branch becomes :class:`RemovedBranch`, which adds that bias, and
the branch's own pre-norm (``norm1`` / ``norm2``), whose output nothing reads any more, becomes ``nn.Identity``.
That needs a block whose forward is known to be pre-norm (``x + ls(branch(norm(x)))``): timm's ViT ``Block``, BEiT's
``Block`` and EVA's ``EvaBlock``; a post-norm block (``ResPostBlock``, ``EvaBlockPostNorm``) would put the norm
after the branch, and is refused.

Not touched: the embedding width, hence layer scale (``gamma_1``/``gamma_2``, ``ls1``/``ls2``), norms outside the
attention/MLP width, and the model-level rotary embedding. Other kinds (e.g. timm's ``AttentionRope``, whose rotary
embedding may differ per head) are refused with the class name.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import GluMlp, Mlp, SwiGLU, apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

__all__ = [
    "AttentionAdapter", "MlpAdapter", "PrunedBeitAttention", "PrunedEvaAttention", "attention_adapter",
    "RemovedBranch", "attention_problem", "head_counts", "mlp_adapter", "mlp_problem", "mlp_widths", "prune_heads",
    "prune_mlp", "remove_branch", "removal_problem",
]


# --- attention ------------------------------------------------------------------------------------------------------


class AttentionAdapter:
    """What head pruning needs to know about one attention class.

    Subclasses name the Linears whose output rows are laid out ``(part, head, dim)`` (``parts`` = 3 for a fused
    qkv, 1 for a separate q, k or v projection) and the per-head vectors the attention holds itself; the rest
    (scores, surgery) is the same for every kind.
    """

    #: the class name users know it by, for messages
    label = "attention"

    def projections(self, attn: nn.Module) -> list[tuple[str, int]]:
        """``(attribute, parts)`` of the q/k/v projections, in the order their heads are scored."""
        raise NotImplementedError

    def head_vectors(self, attn: nn.Module) -> list[str]:
        """Attributes (parameters or buffers) over the attention width, one slice per head, e.g. ``q_bias``."""
        return []

    def heads(self, attn: nn.Module) -> int:
        """Current head count (an attribute, so it reads right after later techniques replaced the Linears)."""
        return int(attn.num_heads)

    def head_dim(self, attn: nn.Module) -> int:
        return int(attn.head_dim)

    def heads_output(self, attn: nn.Module) -> nn.Module:
        """The module whose input is the concatenated per-head outputs, ``(..., heads * head_dim)``."""
        return attn.proj

    def problem(self, attn: nn.Module) -> str | None:
        """Why this attention's heads cannot be pruned, or None."""
        problem = _not_plain_linears(attn, [name for name, _ in self.projections(attn)] + ["proj"])
        if problem:
            return problem
        gate = getattr(attn, "gate", None)
        if gate is not None and not isinstance(gate, nn.Linear):
            return "the attention gate is not a Linear layer"
        norm = getattr(attn, "norm", None)
        if norm is not None and not isinstance(norm, (nn.Identity, nn.LayerNorm)):
            return f"the attention output norm is a {type(norm).__name__}, not a LayerNorm"
        return None

    def head_weights(self, attn: nn.Module) -> torch.Tensor:
        """``heads x n``: every q, k, v and output-projection weight of each head (for magnitude scores)."""
        h, d = self.heads(attn), self.head_dim(attn)
        rows = [getattr(attn, name).weight.detach().view(parts, h, d, -1).transpose(0, 1).reshape(h, -1)
                for name, parts in self.projections(attn)]
        proj = attn.proj.weight.detach().view(-1, h, d).transpose(0, 1).reshape(h, -1)
        return torch.cat([*rows, proj], dim=1)

    def prune(self, attn: nn.Module, keep: Sequence[int]) -> None:
        """Keep only the heads ``keep`` (indices into the current heads), in place."""
        h, d = self.heads(attn), self.head_dim(attn)
        idx = _indices(keep, h, "head")
        per_head = _positions(idx, d)  # attention-width positions of the kept heads
        for name, parts in self.projections(attn):
            _keep_rows(getattr(attn, name), torch.cat([part * h * d + per_head for part in range(parts)]))
        if getattr(attn, "gate", None) is not None:
            _keep_rows(attn.gate, per_head)
        for name in self.head_vectors(attn):
            _keep_vector(attn, name, per_head)
        _keep_columns(attn.proj, per_head)
        if isinstance(getattr(attn, "norm", None), nn.LayerNorm):
            _keep_norm(attn.norm, per_head)
        self._after_heads_removed(attn, idx)
        attn.num_heads = int(idx.numel())

    def _after_heads_removed(self, attn: nn.Module, idx: torch.Tensor) -> None:
        """Kind-specific state to follow the kept heads ``idx`` (``num_heads`` still holds the old count)."""


class StandardAttentionAdapter(AttentionAdapter):
    label = "timm.layers.Attention"

    def projections(self, attn: nn.Module) -> list[tuple[str, int]]:
        return [("qkv", 3)]

    def problem(self, attn: nn.Module) -> str | None:
        if not hasattr(attn, "attn_dim"):  # older timm reshapes by the embedding width, which breaks once heads go
            return "this timm version's Attention has no 'attn_dim'; head pruning needs timm >= 1.0.20"
        return super().problem(attn)

    def _after_heads_removed(self, attn: nn.Module, idx: torch.Tensor) -> None:
        attn.attn_dim = int(idx.numel()) * attn.head_dim


class BeitAttentionAdapter(AttentionAdapter):
    label = "timm.models.beit.Attention"

    def projections(self, attn: nn.Module) -> list[tuple[str, int]]:
        return [("qkv", 3)]

    def head_vectors(self, attn: nn.Module) -> list[str]:
        return [] if attn.q_bias is None else ["q_bias", "k_bias", "v_bias"]

    def head_dim(self, attn: nn.Module) -> int:  # BEiT keeps no head_dim attribute (it may differ from dim // heads)
        return int(attn.proj.in_features) // int(attn.num_heads)

    def _after_heads_removed(self, attn: nn.Module, idx: torch.Tensor) -> None:
        if attn.relative_position_bias_table is not None:  # (relative distances, heads)
            table = attn.relative_position_bias_table
            attn.relative_position_bias_table = _param(table[:, idx.to(table.device)], table)
        if type(attn) is BeitAttention:
            attn.__class__ = PrunedBeitAttention
            attn.register_buffer("head_index", torch.arange(attn.num_heads, device=attn.proj.weight.device))
        attn.head_index = attn.head_index[idx.to(attn.head_index.device)]


class EvaAttentionAdapter(AttentionAdapter):
    label = "timm.models.eva.EvaAttention"

    def projections(self, attn: nn.Module) -> list[tuple[str, int]]:
        return [("qkv", 3)] if attn.qkv is not None else [("q_proj", 1), ("k_proj", 1), ("v_proj", 1)]

    def head_vectors(self, attn: nn.Module) -> list[str]:
        return [] if attn.q_bias is None else ["q_bias", "k_bias", "v_bias"]

    def _after_heads_removed(self, attn: nn.Module, idx: torch.Tensor) -> None:
        if type(attn) is EvaAttention:
            attn.__class__ = PrunedEvaAttention


class PrunedBeitAttention(BeitAttention):
    """timm's BEiT attention after heads were removed: the same computation, with the joined head outputs reshaped
    to the kept heads' width instead of the input width; ``head_index`` picks the kept heads' slices of a shared
    relative position bias."""

    head_index: torch.Tensor

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = _split_heads(_fused_qkv(self, x), B, N, self.num_heads)
        biases = []
        if self.relative_position_bias_table is not None:
            biases.append(self._get_rel_pos_bias())
        if shared_rel_pos_bias is not None:
            biases.append(shared_rel_pos_bias.index_select(-3, self.head_index))
        if self.fused_attn:
            mask = functools.reduce(operator.add, biases) if biases else None
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            for bias in biases:
                scores = scores + bias
            x = self.attn_drop(scores.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


class PrunedEvaAttention(EvaAttention):
    """timm's EVA attention after heads were removed: the same computation, with the joined head outputs reshaped
    to the kept heads' width instead of the input width."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = _split_heads(_fused_qkv(self, x), B, N, self.num_heads)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rotate(self, q, rope, v), _rotate(self, k, rope, v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal=is_causal))
            x = self.attn_drop(scores.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _fused_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BEiT's and EVA's fused projection: ``qkv`` has no bias of its own, the q/k/v biases are added to it."""
    if attn.q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:  # set when a later technique replaced qkv: call the module, then add
        qkv = attn.qkv(x)
        qkv += bias
        return qkv
    return F.linear(x, weight=attn.qkv.weight, bias=bias)


def _split_heads(qkv: torch.Tensor, B: int, N: int, heads: int) -> tuple[torch.Tensor, ...]:
    """``(B, N, 3 * heads * d)`` -> q, k, v of shape ``(B, heads, N, d)``."""
    return tuple(qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


def _rotate(attn: nn.Module, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """EVA's rotary embedding on the patch tokens; prefix (class, register) tokens are left as they are."""
    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


# --- MLP ------------------------------------------------------------------------------------------------------------


class MlpAdapter:
    """What MLP pruning needs to know about one MLP class: the Linears that produce the hidden width (``parts`` =
    how many blocks of the hidden width their rows hold, 2 for GluMlp's packed gate and value) and the hidden
    width's only reader, ``fc2``."""

    label = "MLP"

    def inputs(self, mlp: nn.Module) -> list[tuple[str, int]]:
        raise NotImplementedError

    def width(self, mlp: nn.Module) -> int:
        """Hidden width, read from ``fc2``'s input (low-rank and quantized replacements keep ``in_features``)."""
        return int(mlp.fc2.in_features)

    def hidden_output(self, mlp: nn.Module) -> nn.Module:
        """The module whose input is the hidden activation, one column per channel."""
        return mlp.fc2

    def problem(self, mlp: nn.Module) -> str | None:
        problem = _not_plain_linears(mlp, [name for name, _ in self.inputs(mlp)] + ["fc2"])
        if problem:
            return problem
        norm = getattr(mlp, "norm", None)
        if norm is not None and not isinstance(norm, (nn.Identity, nn.LayerNorm)):
            return f"the MLP hidden norm is a {type(norm).__name__}, not a LayerNorm"
        return None

    def channel_weights(self, mlp: nn.Module) -> torch.Tensor:
        """``width x n``: every input row and ``fc2`` column of each hidden channel (for magnitude scores)."""
        w = self.width(mlp)
        rows = [getattr(mlp, name).weight.detach().view(parts, w, -1).transpose(0, 1).reshape(w, -1)
                for name, parts in self.inputs(mlp)]
        return torch.cat([*rows, mlp.fc2.weight.detach().t()], dim=1)

    def prune(self, mlp: nn.Module, keep: Sequence[int]) -> None:
        """Keep only the hidden channels ``keep``, in place."""
        w = self.width(mlp)
        idx = _indices(keep, w, "channel")
        for name, parts in self.inputs(mlp):
            _keep_rows(getattr(mlp, name), torch.cat([part * w + idx for part in range(parts)]))
        _keep_columns(mlp.fc2, idx)
        if isinstance(getattr(mlp, "norm", None), nn.LayerNorm):
            _keep_norm(mlp.norm, idx)


class StandardMlpAdapter(MlpAdapter):
    label = "timm.layers.Mlp"

    def inputs(self, mlp: nn.Module) -> list[tuple[str, int]]:
        return [("fc1", 1)]


class SwiGluAdapter(MlpAdapter):
    label = "timm.layers.SwiGLU"

    def inputs(self, mlp: nn.Module) -> list[tuple[str, int]]:
        return [("fc1_g", 1), ("fc1_x", 1)]


class GluMlpAdapter(MlpAdapter):
    label = "timm.layers.GluMlp"

    def inputs(self, mlp: nn.Module) -> list[tuple[str, int]]:
        return [("fc1", 2)]


# --- lookup ---------------------------------------------------------------------------------------------------------

_ATTENTION: dict[type, AttentionAdapter] = {
    TimmAttention: StandardAttentionAdapter(),
    BeitAttention: BeitAttentionAdapter(),
    PrunedBeitAttention: BeitAttentionAdapter(),
    EvaAttention: EvaAttentionAdapter(),
    PrunedEvaAttention: EvaAttentionAdapter(),
}
_MLP: dict[type, MlpAdapter] = {Mlp: StandardMlpAdapter(), SwiGLU: SwiGluAdapter(), GluMlp: GluMlpAdapter()}


def attention_adapter(attn: object) -> AttentionAdapter | None:
    """The adapter for ``attn``'s exact class, or None when that kind is not supported."""
    return _ATTENTION.get(type(attn))


def mlp_adapter(mlp: object) -> MlpAdapter | None:
    """The adapter for ``mlp``'s exact class, or None when that kind is not supported."""
    return _MLP.get(type(mlp))


def _supported(table: dict[type, AttentionAdapter] | dict[type, MlpAdapter]) -> str:
    return ", ".join(dict.fromkeys(adapter.label for adapter in table.values()))


def attention_problem(block: nn.Module) -> str | None:
    """Why the heads of ``block`` cannot be pruned, or None when they can."""
    attn = getattr(block, "attn", None)
    adapter = attention_adapter(attn)
    if adapter is None:
        return f"attention is {type(attn).__name__}, not a supported kind ({_supported(_ATTENTION)})"
    return adapter.problem(attn)


def mlp_problem(block: nn.Module) -> str | None:
    """Why the MLP of ``block`` cannot be narrowed, or None when it can."""
    mlp = getattr(block, "mlp", None)
    adapter = mlp_adapter(mlp)
    if adapter is None:
        return f"MLP is {type(mlp).__name__}, not a supported kind ({_supported(_MLP)})"
    return adapter.problem(mlp)


def head_counts(model: nn.Module) -> dict[str, int]:
    """``{block name: attention heads}`` for every block with a supported attention kind (also after later
    techniques replaced its Linear layers)."""
    return {name: adapter.heads(m.attn) for name, m in model.named_modules()
            if (adapter := attention_adapter(getattr(m, "attn", None))) is not None}


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """``{block name: MLP hidden width}`` for every block with a supported MLP kind (read from ``fc2``'s input
    width, which low-rank and quantized replacements keep as ``in_features``)."""
    return {name: adapter.width(m.mlp) for name, m in model.named_modules()
            if (adapter := mlp_adapter(getattr(m, "mlp", None))) is not None
            and isinstance(getattr(m.mlp.fc2, "in_features", None), int)}


def prune_heads(attn: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the heads ``keep`` (indices into the current heads) of a supported attention, in place."""
    adapter = attention_adapter(attn)
    if adapter is None:
        raise ValueError(f"cannot prune the heads of a {type(attn).__name__} (supported: {_supported(_ATTENTION)})")
    adapter.prune(attn, keep)


def prune_mlp(mlp: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the hidden channels ``keep`` of a supported MLP, in place."""
    adapter = mlp_adapter(mlp)
    if adapter is None:
        raise ValueError(f"cannot narrow a {type(mlp).__name__} (supported: {_supported(_MLP)})")
    adapter.prune(mlp, keep)


# --- whole branches -------------------------------------------------------------------------------------------------

#: blocks whose forward is ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))`` (exact types)
_PRE_NORM_BLOCKS = (VitBlock, BeitBlock, EvaBlock)
#: branch -> the pre-norm that feeds it
_BRANCH_NORM = {"attn": "norm1", "mlp": "norm2"}


class RemovedBranch(nn.Module):
    """A residual branch with all its heads or channels pruned: what is left of it is the bias of its last Linear,
    the same for every token (zero without a bias). It ignores its input, so the norm before it is gone too."""

    def __init__(self, bias: torch.Tensor | None, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # the attention's extra inputs are unused
        if self.bias is None:
            return x.new_zeros(()).expand(*x.shape[:-1], self.dim)
        return self.bias.to(x.dtype).expand(*x.shape[:-1], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.bias is not None}"


def removal_problem(block: nn.Module, branch: str) -> str | None:
    """Why ``block``'s ``branch`` (``attn`` / ``mlp``) cannot be removed whole, or None when it can."""
    if type(block) not in _PRE_NORM_BLOCKS:
        names = ", ".join(f"{t.__module__.rpartition('.')[2]}.{t.__name__}" for t in _PRE_NORM_BLOCKS)
        return f"removing a whole branch needs a pre-norm block ({names}), not {type(block).__name__}"
    return attention_problem(block) if branch == "attn" else mlp_problem(block)


def remove_branch(block: nn.Module, branch: str) -> None:
    """Replace ``block``'s ``attn`` or ``mlp`` by the bias it adds with nothing left in it, and its norm by identity."""
    problem = removal_problem(block, branch)
    if problem:
        raise ValueError(problem)
    module = getattr(block, branch)
    last = attention_adapter(module).heads_output(module) if branch == "attn" else mlp_adapter(module).hidden_output(module)
    setattr(block, branch, RemovedBranch(last.bias, int(last.out_features)))
    setattr(block, _BRANCH_NORM[branch], nn.Identity())


# --- tensor surgery -------------------------------------------------------------------------------------------------


def _indices(keep: Sequence[int], total: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(sorted({int(i) for i in keep}), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError(f"cannot remove every {what}")
    if idx[0] < 0 or idx[-1] >= total:
        raise ValueError(f"{what} index out of range 0..{total - 1}")
    return idx


def _positions(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Positions in the attention width (laid out ``(head, dim)``) of the heads ``heads``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = _param(linear.weight[rows], linear.weight)
    if linear.bias is not None:
        linear.bias = _param(linear.bias[rows], linear.bias)
    linear.out_features = int(rows.numel())


def _keep_columns(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = _param(linear.weight[:, cols.to(linear.weight.device)], linear.weight)
    linear.in_features = int(cols.numel())


def _keep_vector(module: nn.Module, name: str, idx: torch.Tensor) -> None:
    """Slice a parameter or a buffer (BEiT/EVA's non-persistent zero ``k_bias``) over the attention width."""
    old = getattr(module, name)
    new = old.detach()[idx.to(old.device)].clone()
    setattr(module, name, _param(new, old) if isinstance(old, nn.Parameter) else new)


def _keep_norm(norm: nn.LayerNorm, idx: torch.Tensor) -> None:
    if norm.weight is not None:
        norm.weight = _param(norm.weight[idx.to(norm.weight.device)], norm.weight)
    if norm.bias is not None:
        norm.bias = _param(norm.bias[idx.to(norm.bias.device)], norm.bias)
    norm.normalized_shape = (int(idx.numel()),)


def _not_plain_linears(module: nn.Module, names: list[str]) -> str | None:
    """Surgery slices nn.Linear weights: a replaced layer (low rank, quantized) means pruning ran too late."""
    if all(isinstance(getattr(module, name, None), nn.Linear) for name in names):
        return None
    return f"{'/'.join(names)} are no longer plain Linear layers (pruning must run before other techniques)"
