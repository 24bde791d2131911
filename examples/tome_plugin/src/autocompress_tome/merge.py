"""Bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), written from the paper.

One merge step takes the tokens of a block (after its attention), splits the non-protected ones into two alternating
sets A and B, links every A token to its most similar B token (cosine similarity of the attention keys, averaged over
heads), keeps the ``r`` most similar links and merges each linked A token into its B token. Merging is a weighted
average by *size* (how many input patches a token already stands for), so that merging twice is the same as averaging
all the patches once. The ``r`` merged tokens are gone: every later layer runs on fewer tokens, which is where the
speed comes from. Protected tokens (the class token, a distillation token, register tokens) are never merged.

:class:`TokenState` carries what merging must remember through the rest of the forward pass: the sizes (used by
proportional attention, ``softmax(q k^T / sqrt(d) + log s)``) and, for every input token, which merged token it
ended up in, so the output can be laid out again as the full token grid (:meth:`TokenState.unmerge`). Laid out that
way, an average pool over tokens equals the size-weighted average of the merged tokens. A model that pools its class
token does not need that, and skips the bookkeeping.
"""

from __future__ import annotations

import torch


class TokenState:
    """Per-forward-pass bookkeeping shared by the merging blocks of one model."""

    def __init__(self, track_source: bool = True) -> None:
        self.track_source = track_source  # only needed to lay tokens out on the input grid again (unmerge)
        self.size: torch.Tensor | None = None  # (B, N, 1) patches per token; None while nothing is merged
        self.source: torch.Tensor | None = None  # (B, N0) index of the current token each input token lives in

    def reset(self) -> None:
        self.size = None
        self.source = None

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention bias ``log(size)`` over keys, shaped (B, 1, 1, N); None while sizes are all 1."""
        if self.size is None:
            return None
        return self.size.log().to(dtype).transpose(1, 2).unsqueeze(1)

    def merge(self, x: torch.Tensor, keys: torch.Tensor, r: int, protected: int) -> torch.Tensor:
        """Merge ``r`` tokens of ``x`` (B, N, C) using ``keys`` (B, N, D) as the similarity metric.

        ``r`` is clamped to what one bipartite step can merge: half of the non-protected tokens. Returns the
        (B, N - r, C) tokens laid out as ``[protected, kept A tokens, B tokens]``.
        """
        batch, n, channels = x.shape
        free = n - protected
        r = min(r, free // 2)
        if r <= 0:
            return x
        if self.size is None:
            self.size = x.new_ones(batch, n, 1)
        if self.track_source and self.source is None:
            self.source = torch.arange(n, device=x.device).expand(batch, n)

        with torch.no_grad():  # which tokens merge is a discrete choice; gradients flow through the averages
            metric = keys[:, protected:]
            metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            a_keys, b_keys = metric[:, ::2], metric[:, 1::2]
            similarity = a_keys @ b_keys.transpose(1, 2)  # (B, Na, Nb)
            best, partner = similarity.max(dim=-1)  # each A token's most similar B token
            order = best.argsort(dim=-1, descending=True)
            merged_a = order[:, :r]  # A positions that disappear
            kept_a = order[:, r:]
            into_b = partner.gather(1, merged_a)  # the B position each of them joins

        weighted = x * self.size
        head, free_x = weighted[:, :protected], weighted[:, protected:]
        head_s, free_s = self.size[:, :protected], self.size[:, protected:]
        a_x, b_x = free_x[:, ::2], free_x[:, 1::2]
        a_s, b_s = free_s[:, ::2], free_s[:, 1::2]

        def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        b_x = b_x.scatter_add(1, into_b.unsqueeze(-1).expand(-1, -1, channels), take(a_x, merged_a))
        b_s = b_s.scatter_add(1, into_b.unsqueeze(-1), take(a_s, merged_a))
        new_size = torch.cat([head_s, take(a_s, kept_a), b_s], dim=1)
        new_x = torch.cat([head, take(a_x, kept_a), b_x], dim=1) / new_size

        if self.track_source:
            self._follow(batch, n, protected, kept_a, merged_a, into_b)
        self.size = new_size
        return new_x

    def _follow(self, batch: int, n: int, protected: int, kept_a: torch.Tensor, merged_a: torch.Tensor,
                into_b: torch.Tensor) -> None:
        """Update ``source`` so every input token still points at the token it now lives in."""
        device = kept_a.device
        n_a, n_b = (n - protected + 1) // 2, (n - protected) // 2
        n_kept = kept_a.shape[1]
        new_index = torch.empty(batch, n, dtype=torch.long, device=device)
        new_index[:, :protected] = torch.arange(protected, device=device)
        a_new = torch.empty(batch, n_a, dtype=torch.long, device=device)
        a_new.scatter_(1, kept_a, (protected + torch.arange(n_kept, device=device)).expand(batch, n_kept))
        a_new.scatter_(1, merged_a, protected + n_kept + into_b)
        new_index[:, protected::2] = a_new
        new_index[:, protected + 1 :: 2] = (protected + n_kept + torch.arange(n_b, device=device)).expand(batch, n_b)
        self.source = new_index.gather(1, self.source)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Lay merged tokens out on the input token grid again: every input token gets the token it was merged into."""
        if self.source is None:
            return x
        return x.gather(1, self.source.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
