"""Train a base classifier once (the demo's base checkpoint when none is cached)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autocompress.data import Dataset
from autocompress.evaluate import accuracy
from autocompress.models import save_checkpoint


def train_base(
    model: nn.Module,
    data: Dataset,
    path: str | Path,
    epochs: int = 4,
    lr: float = 2e-3,
    batch_size: int = 128,
    weight_decay: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """Train ``model`` on the training split, save it to ``path``; returns validation accuracy."""
    torch.manual_seed(seed)
    images, labels = data.train.images, data.train.labels
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="train base", unit="step", disable=not progress)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    val = accuracy(model, data.val)
    print(f"trained base model in {time.perf_counter() - start:.0f} s: validation accuracy {val:.4f}")
    save_checkpoint(model, path)
    return val
