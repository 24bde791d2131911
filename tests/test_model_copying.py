"""The profiler's cheap model copies (latency_model/copying.py): only the changed subtrees are new objects, the
rest is shared, and changing the copy never changes the original."""

from __future__ import annotations

import torch
from torch import nn

from autocompress.latency_model.copying import path_copy, path_copy_many, shallow_copy
from conftest import make_tiny_vit


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_a_path_copy_deep_copies_the_subtree_and_shares_everything_else():
    model = make_tiny_vit()
    before = {n: t.clone() for n, t in tensors(model).items()}
    copied = path_copy(model, "blocks.1.attn")

    assert copied is not model and copied.blocks is not model.blocks and copied.blocks[1] is not model.blocks[1]
    assert copied.blocks[1].attn is not model.blocks[1].attn
    # off the path: the same modules and tensors
    assert copied.blocks[0] is model.blocks[0] and copied.patch_embed is model.patch_embed
    assert copied.blocks[1].mlp is model.blocks[1].mlp and copied.head is model.head
    assert copied.cls_token is model.cls_token and copied.pos_embed is model.pos_embed
    # inside the subtree: new tensors with the same values
    assert copied.blocks[1].attn.qkv.weight is not model.blocks[1].attn.qkv.weight
    assert torch.equal(copied.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)

    # replacing a module in the copy, or changing the copied subtree, leaves the original as it was
    copied.blocks[1].attn.register_module("proj", nn.Identity())
    copied.blocks.register_module("0", nn.Identity())
    copied.register_module("head", nn.Linear(48, 3))
    with torch.no_grad():
        copied.blocks[1].attn.qkv.weight.zero_()
    assert isinstance(model.blocks[1].attn.proj, nn.Linear) and isinstance(model.blocks[0], type(model.blocks[1]))
    assert model.head.out_features == 10
    assert all(torch.equal(before[n], t) for n, t in tensors(model).items())
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10) and copied(x).shape == (2, 3)


def test_several_subtrees_share_the_modules_on_their_paths_once():
    model = make_tiny_vit()
    copied = path_copy_many(model, ["blocks.0.mlp", "blocks.1", "head"])
    assert copied.blocks is not model.blocks
    assert copied.blocks[0] is not model.blocks[0] and copied.blocks[0].attn is model.blocks[0].attn
    assert copied.blocks[0].mlp is not model.blocks[0].mlp
    assert copied.blocks[1] is not model.blocks[1] and copied.blocks[1].attn is not model.blocks[1].attn
    assert copied.head is not model.head and copied.norm is model.norm
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), copied(x))


def test_a_shallow_copy_has_containers_of_its_own():
    block = make_tiny_vit().blocks[0]
    new = shallow_copy(block)
    assert new is not block and new.attn is block.attn and new.norm1.weight is block.norm1.weight
    new.register_module("attn", nn.Identity())
    new.register_buffer("extra", torch.zeros(1))
    assert isinstance(new.attn, nn.Identity) and not isinstance(block.attn, nn.Identity)
    assert "extra" not in dict(block.named_buffers())
    assert path_copy(block, "") is not block and path_copy(block, "").attn is not block.attn
