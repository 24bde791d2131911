"""The default space searches the timm ViT family a user is likely to bring, not only plain ViT/DeiT: BEiT (relative
position bias per head) and EVA-02 (rotary attention, SwiGLU), with their heads and MLP width pruned."""

from __future__ import annotations

import pandas as pd
import pytest
import timm
import torch

import autocompress
from autocompress.data import Dataset

SHAPE = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=3)


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_a_search_with_the_default_space_prunes_beit_and_eva(name, fmnist, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **SHAPE).eval()
    data = Dataset(fmnist.train.head(256), fmnist.val.head(200), fmnist.test.head(200), fmnist.classes)
    logs: list[str] = []
    config = {"model": {"name": name, "kwargs": SHAPE}, "budget": "latency=0.9x", "space": "vit",
              "target": {"threads": 2, "batch_size": 32, "warmup": 1, "repeats": 3},
              "search": {"trials": 4, "sampler": "random", "seed": 0, "baselines": False, "strategy": "sample"}, "out": str(tmp_path / "run")}
    result = autocompress.search(config, model=model, data=data, progress=False, log=logs.append)
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert not any("pruning: left out" in line for line in logs), logs
    heads = [f"blocks.{i}:pruning.heads" for i in range(2)]
    mlp = [f"blocks.{i}:pruning.mlp" for i in range(2)]
    assert set(heads + mlp) <= set(trials.columns)
    assert (trials["state"] != "FAIL").all(), trials["error"].tolist()
    pruned = trials[(trials[heads + mlp] < 1.0).any(axis=1)]
    assert len(pruned) >= 1 and (pruned["state"] == "COMPLETE").all()
    assert (pruned["memory_mb"] < result.baseline["memory_mb"]).all()  # fewer weights, counted exactly
