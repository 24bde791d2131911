"""How important each attention head and MLP hidden channel is; the least important ones are removed.

Criteria (the technique's global ``criterion`` option):

- ``l1`` / ``l2``: magnitude of every weight that belongs to the unit — a head's q, k and v rows (in the fused
  ``qkv`` or the separate ``q_proj``/``k_proj``/``v_proj``) and its columns in ``proj``; a channel's row in every
  Linear producing the hidden width (``fc1``; SwiGLU's ``fc1_g`` and ``fc1_x``; both halves of GluMlp's ``fc1``)
  and its column in ``fc2``. Biases, gates and BEiT's relative position bias are not counted. No data needed.
- ``taylor``: gradient-based, on calibration images: the first-order change of the loss when the unit's activation
  is removed, ``|a . dL/da|`` per image, averaged (Molchanov et al. 2019; Michel et al. 2019 for heads). Unlike
  weight magnitude it sees what the data drives and what the later layers and the classifier actually use.
- ``random``: seeded random scores, a baseline to compare criteria against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from autocompress_pruning.surgery import (
    AttentionAdapter,
    MlpAdapter,
    attention_adapter,
    attention_problem,
    mlp_adapter,
    mlp_problem,
)

CRITERIA: dict[str, str] = {
    "l1": "sum of |weights| of the unit (no data)",
    "l2": "L2 norm of the unit's weights (no data)",
    "taylor": "first-order loss change on calibration images (gradient x activation)",
    "random": "seeded random choice (a baseline)",
}
DATA_DRIVEN = frozenset({"taylor"})


@dataclass
class BlockScores:
    heads: torch.Tensor | None = None  # one score per current head
    channels: torch.Tensor | None = None  # one score per MLP hidden channel


def weight_scores(block: nn.Module, heads: bool, channels: bool, p: int) -> BlockScores:
    """Magnitude scores (``p`` = 1 or 2) from the weights alone."""
    out = BlockScores()
    if heads:
        out.heads = _norm(_attention(block).head_weights(block.attn), p)
    if channels:
        out.channels = _norm(_mlp(block).channel_weights(block.mlp), p)
    return out


def random_scores(block: nn.Module, heads: bool, channels: bool, generator: torch.Generator) -> BlockScores:
    """Seeded random scores, one per current head / hidden channel."""
    return BlockScores(
        heads=torch.rand(_attention(block).heads(block.attn), generator=generator) if heads else None,
        channels=torch.rand(_mlp(block).width(block.mlp), generator=generator) if channels else None,
    )


def taylor_scores(
    model: nn.Module,
    wanted: Mapping[str, tuple[bool, bool]],
    calibration: Callable[[], Iterator[torch.Tensor]],
    between_batches: Callable[[], None] | None = None,
) -> dict[str, BlockScores]:
    """First-order (Taylor) scores for the blocks in ``wanted`` (``name -> (heads?, channels?)``), one data pass.

    Removing a unit zeroes its activation ``a``; to first order the loss changes by ``-a . dL/da``. Per image the
    change is summed over tokens (and a head's dimensions) and its magnitude averaged over images. The loss is the
    cross-entropy against the model's own predictions, so no labels are needed. Hooks read the input of the module
    after the heads (``attn.proj`` for every supported kind: the concatenated head outputs) and of the hidden
    activation's reader (``mlp.fc2``) of the unpruned model; gradients are taken with respect to those activations
    only, so the weights' ``.grad`` is never touched.
    ``between_batches`` runs before each batch (the trial's time limit check).
    """
    blocks = {name: model.get_submodule(name) for name in wanted}
    seen: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def keep_input(key: tuple[str, str]):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[key] = args[0]

        return hook

    for name, (heads, channels) in wanted.items():
        block = blocks[name]
        if heads:
            target = _attention(block).heads_output(block.attn)
            handles.append(target.register_forward_pre_hook(keep_input((name, "heads"))))
        if channels:
            target = _mlp(block).hidden_output(block.mlp)
            handles.append(target.register_forward_pre_hook(keep_input((name, "channels"))))
    totals: dict[tuple[str, str], torch.Tensor] = {}
    images_seen = 0
    was_training = model.training
    model.eval()
    try:
        for images in calibration():
            if between_batches is not None:
                between_batches()
            seen.clear()
            with torch.inference_mode(False), torch.enable_grad():
                # Gradients flow from the input, so frozen weights work too and no weight gradient is stored.
                logits = model(images.detach().clone().requires_grad_(True))
                logits = logits.reshape(-1, logits.shape[-1]).float()
                loss = F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
                keys = list(seen)
                grads = torch.autograd.grad(loss, [seen[k] for k in keys])
            for key, grad in zip(keys, grads):
                act = seen[key].detach().float()
                change = (act * grad.float()).reshape(act.shape[0], -1, act.shape[-1]).sum(1)  # image x width
                if key[1] == "heads":
                    attn = blocks[key[0]].attn
                    adapter = _attention(blocks[key[0]])
                    change = change.view(change.shape[0], adapter.heads(attn), adapter.head_dim(attn)).sum(-1)
                _accumulate(totals, key, change.abs().sum(0))
            images_seen += int(images.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
        model.train(was_training)
    if images_seen == 0:
        raise ValueError("the calibration data is empty")
    return {
        name: BlockScores(
            heads=totals[(name, "heads")] / images_seen if heads else None,
            channels=totals[(name, "channels")] / images_seen if channels else None,
        )
        for name, (heads, channels) in wanted.items()
    }


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, in their original order (ties: the earlier index wins)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[:keep].tolist())


def _attention(block: nn.Module) -> AttentionAdapter:
    adapter = attention_adapter(getattr(block, "attn", None))
    if adapter is None:
        raise ValueError(attention_problem(block))
    return adapter


def _mlp(block: nn.Module) -> MlpAdapter:
    adapter = mlp_adapter(getattr(block, "mlp", None))
    if adapter is None:
        raise ValueError(mlp_problem(block))
    return adapter


def _norm(rows: torch.Tensor, p: int) -> torch.Tensor:
    rows = rows.float()
    return rows.abs().sum(dim=1) if p == 1 else rows.square().sum(dim=1).sqrt()


def _accumulate(sums: dict, key: tuple[str, str], value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()
