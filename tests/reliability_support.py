"""Fixtures shared by the reliability tests (bad input, faults, interruption, security): the tiny ViT config of
``conftest.py`` on a small copy of the real Fashion-MNIST files, so that runs and subprocesses start fast."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
import yaml

from autocompress.data import FASHION_MNIST_FILES, read_idx

from conftest import FASHION_MNIST

N_TRAIN, N_TEST = 2000, 400


def write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">I", 0x0800 | data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.contiguous().numpy().tobytes())


@pytest.fixture(scope="session")
def small_fmnist(tmp_path_factory) -> Path:
    """The first images of the real Fashion-MNIST files, written back as plain IDX files."""
    folder = tmp_path_factory.mktemp("fmnist_small")
    for key, name in FASHION_MNIST_FILES.items():
        data = read_idx(FASHION_MNIST / name)
        write_idx(folder / name, data[: N_TRAIN if key.startswith("train") else N_TEST])
    return folder


@pytest.fixture
def cfg(tiny_config: dict, small_fmnist: Path) -> dict:
    """``tiny_config`` (the trained tiny ViT) on the small data copy."""
    config = yaml.safe_load(yaml.safe_dump(tiny_config))  # a deep copy
    config["data"].update(path=str(small_fmnist), val_size=400, train_subset=800)
    return config


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
