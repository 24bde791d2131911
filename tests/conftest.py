"""Shared fixtures: real Fashion-MNIST (a subset), a tiny timm ViT briefly trained on it, and the plugins as
installed (loaded through the entry-point group, like a user gets them)."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with any other process on the cores, spinning threads make timed
# runs 10-40x slower at random and speed comparisons meaningless. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from autocompress.data import Dataset, Split, load_fashion_mnist

FASHION_MNIST = Path(os.environ.get("AUTOCOMPRESS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
TINY_VIT = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=2)

torch.set_num_threads(2)


def _keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel (what jemalloc or
    tcmalloc do, and ONNX Runtime's and OpenVINO's arenas). By default every activation above the mmap threshold is
    mapped and unmapped on each call, and each forward pass faults its activations in again: on the tiny timing ViT
    (batch 64, one thread) that was 1,400-4,900 page faults and 1.6-4.4 ms of kernel time per 20 ms pass, varying
    with what the process had allocated before, so a layer timed inside one model and the same layer inside another
    differed by the allocator's history, not by their kernels (the latency table's prediction error under the AVX2
    caps on a Xeon with AMX: 0.06-0.21 before, 0.02-0.06 after). Speed tests compare kernels; the allocator's page
    faults are no technique's doing. Returns whether it was set (glibc only)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


KEEPS_FREED_MEMORY = _keep_freed_memory()


def pytest_report_header(config) -> list[str]:
    """Every test log names the CPU it ran on: speed relations are this CPU's (see autocompress/cpu.py)."""
    from autocompress.cpu import describe

    allocator = ("malloc keeps freed memory (no page faults per pass; see conftest._keep_freed_memory)"
                 if KEEPS_FREED_MEMORY else "malloc: the platform's default (not glibc)")
    return [*describe().splitlines(), allocator]


def pytest_collection_modifyitems(items) -> None:
    """The contract suite's speed claims are speed tests too (``-m speed``: what CI runs again under the AVX2 caps);
    the suite cannot mark them itself, since a third party's pytest does not know the marker."""
    for item in items:
        if item.originalname == "test_claimed_speedup_is_real_and_measured":
            item.add_marker(pytest.mark.speed)


@pytest.fixture(scope="session")
def fmnist_full() -> Dataset:
    if not FASHION_MNIST.is_dir():
        pytest.fail(f"Fashion-MNIST not found at {FASHION_MNIST}: run `make data` (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist(FASHION_MNIST, val_size=5000, seed=0)


@pytest.fixture(scope="session")
def fmnist(fmnist_full: Dataset) -> Dataset:
    """A small real subset, so tests stay fast: 6000 train, 1000 val, 1000 test."""
    d = fmnist_full
    return Dataset(d.train.head(6000), d.val.head(1000), d.test.head(1000), d.classes)


@pytest.fixture(scope="session")
def plugins():
    from autocompress.pluginmanager import load_plugins

    return load_plugins()


def make_tiny_vit(**overrides) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides}).eval()


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, fmnist: Dataset):
    """A tiny ViT trained for one epoch on the subset (~75% val accuracy) and its checkpoint path."""
    from autocompress.train import train_base

    model = make_tiny_vit()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    train_base(model, fmnist, path, epochs=1, lr=3e-3, batch_size=64, progress=False)
    return model, path


@pytest.fixture
def tiny_config(tmp_path: Path, trained_tiny) -> dict:
    """A run config dict for the trained tiny ViT on real Fashion-MNIST, small enough to search in seconds."""
    _, ckpt = trained_tiny
    return {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": dict(TINY_VIT), "checkpoint": str(ckpt)},
        "data": {"kind": "fashion_mnist", "path": str(FASHION_MNIST), "val_size": 1000, "train_subset": 2000,
                 "calibration_size": 128},
        "target": {"threads": 2, "batch_size": 64, "warmup": 2, "repeats": 5},
        "budget": "latency=0.9x",
        "space": "vit",
        # the sampler's path (uniform baselines first), which most tests here are about; the solver's path
        # (search.strategy: solve, the default) is tested in test_solver.py
        "search": {"trials": 6, "sampler": "tpe", "seed": 0, "strategy": "sample"},
        "out": str(tmp_path / "run"),
    }
