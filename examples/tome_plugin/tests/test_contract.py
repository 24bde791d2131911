"""autocompress-tome against the technique contract (autocompress.testing), plus token merging's own properties.

Run with ``pytest`` in this directory once the distribution is installed (``pip install -e .``).
"""

from __future__ import annotations

import copy

import torch

from autocompress.technique import ApplyContext, TechniqueSettings
from autocompress.testing import ModelSpec, SpeedupClaim, TechniqueContract

from autocompress_tome import TokenMergingTechnique
from autocompress_tome.merge import TokenState

#: 196 patch tokens (a 28x28 image in 2x2 patches), width 192: token count dominates the cost, as in a real ViT
MANY_TOKENS = ModelSpec("vit-w192-d4-196tok", "vit_tiny_patch16_224",
                        dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=192, depth=4, num_heads=3))


def _every_block(r: int):
    def settings(model) -> TechniqueSettings:
        return TechniqueSettings(layers={n: {"r": r} for n in TokenMergingTechnique().candidate_layers(model)})

    return settings


class TestTokenMergingContract(TechniqueContract):
    technique = TokenMergingTechnique()
    plugin = "tome"
    # r is a number of tokens, so the choices depend on how many tokens the model has
    space = None
    speedups = [SpeedupClaim("r32-every-block", MANY_TOKENS, _every_block(32), batch=8, min_speedup=1.0)]

    def space_for(self, spec, model):
        tokens = model.patch_embed.num_patches
        return {"layers": [{"match": "re:blocks\\.\\d+", "r": sorted({0, 1, max(1, tokens // 8), tokens // 2})}]}


def test_merging_averages_exactly_the_tokens_it_joins():
    """After any sequence of merges, each token is the mean of the input tokens it stands for, and sizes count them."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 21, 5)
    state, x = TokenState(), x0
    for r in (4, 3, 50):  # 50 is clamped to half of the free tokens
        x = state.merge(x, torch.randn(3, x.shape[1], 8), r, protected=2)
    assert x.shape[1] == 8
    for b in range(3):
        for j in range(x.shape[1]):
            members = (state.source[b] == j).nonzero().flatten()
            assert len(members) == int(state.size[b, j, 0])
            assert torch.allclose(x[b, j], x0[b, members].mean(0), atol=1e-5)
    assert (state.source[:, :2] == torch.arange(2)).all(), "protected tokens never move"


def test_average_pooling_sees_merged_tokens_weighted_by_size_and_token_pooling_sees_fewer_tokens():
    avg = ModelSpec("vit-avg-64tok", "vit_tiny_patch16_224", dict(img_size=32, patch_size=4, in_chans=1, num_classes=5,
                    embed_dim=48, depth=3, num_heads=2, class_token=False, global_pool="avg"))
    for spec, grid in ((avg, True), (MANY_TOKENS, False)):
        model = spec.create()
        merged = TokenMergingTechnique().apply(copy.deepcopy(model), _every_block(8)(model), ApplyContext())
        x = spec.images(2)
        with torch.inference_mode():
            dense_tokens, merged_tokens = model.forward_features(x), merged.forward_features(x)
        if grid:  # every input token position holds the token it was merged into: the mean is size-weighted
            assert merged_tokens.shape == dense_tokens.shape
        else:  # the class token is read directly; merged tokens stay merged
            assert merged_tokens.shape[1] == dense_tokens.shape[1] - 8 * len(model.blocks)
        assert torch.isfinite(merged_tokens).all()
