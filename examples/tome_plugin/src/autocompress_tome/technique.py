"""Token merging as an autocompress technique: per ViT block, how many tokens ``r`` to merge after its attention.

It acts on the blocks of a timm ``VisionTransformer`` (``blocks.0`` ... ``blocks.11``), at stage STRUCTURE: it
changes how many tokens flow through the rest of the network, so it runs before low rank, recovery training and
numeric formats, which then act on the same ``attn.qkv`` / ``mlp.fc1`` layers as before. It has no weights of its
own and needs no data, so a saved model is rebuilt exactly from its policy.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings, replace_module

from autocompress_tome.blocks import ATTENTION_PARTS, TokenMergingBlock
from autocompress_tome.merge import TokenState


def _vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, block) pairs token merging can act on: the pre-norm blocks of a timm VisionTransformer."""
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or getattr(model, "patch_embed", None) is None:
        return []
    out = []
    for i, block in enumerate(blocks):
        usable = isinstance(block, (Block, TokenMergingBlock)) and all(
            hasattr(block.attn, part) for part in ATTENTION_PARTS
        )
        if usable:
            out.append((f"blocks.{i}", block))
    # merging is only sound when every block of the sequence can carry token sizes along
    return out if len(out) == len(blocks) else []


def patch_tokens(model: nn.Module) -> int:
    """How many patch tokens (not counting class/register tokens) enter the first block."""
    return int(model.patch_embed.num_patches)


class TokenMergingTechnique(Technique):
    """ToMe: merge ``r`` similar tokens in a block; later blocks run on fewer tokens. ``r = 0`` leaves it alone."""

    name = "tome"
    stage = Stage.STRUCTURE
    layer_knobs = {"r": 0}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return [name for name, _ in _vit_blocks(model)]

    def check_value(self, model: nn.Module, layer: str | None, knob: str, value: Any) -> None:
        if knob != "r":
            raise ValueError(f"unknown knob {knob!r} (token merging has 'r')")
        if layer is None:
            raise ValueError("'r' is set per block")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("r must be a whole number of tokens")
        if value < 0:
            raise ValueError("r cannot be negative")
        limit = patch_tokens(model) // 2
        if value > limit:
            raise ValueError(f"a block can merge at most half of its {patch_tokens(model)} patch tokens ({limit})")

    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        blocks = _vit_blocks(model)
        names = [name for name, _ in blocks]
        unknown = sorted(set(settings.layers) - set(names))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a ViT block token merging can act on")
        r = [int(settings.layers.get(name, {}).get("r", 0)) for name in names]
        if not any(r):
            return model
        start = next(i for i, value in enumerate(r) if value)
        protected = int(getattr(model, "num_prefix_tokens", 0))
        # pooling that reads only prefix tokens does not care where merged tokens sit; any other pooling does
        grid = not (getattr(model, "global_pool", "") == "token" and getattr(model, "attn_pool", None) is None)
        state = TokenState(track_source=grid)
        # every block from the first merge on must weight attention by token size; the last one unmerges
        for i in range(start, len(blocks)):
            name, block = blocks[i]
            replace_module(model, name, TokenMergingBlock(block, r[i], protected, state, first=i == start,
                                                          last=i == len(blocks) - 1, unmerge=grid))
        return model
