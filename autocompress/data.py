"""Data: Fashion-MNIST from its IDX files, or a user's image folders, as train / validation / test tensors.

The validation split is carved from the training split (seeded) and is what the search chooses on; the test split
is only reported. Images are held as normalized float tensors: small ViT data sets fit in memory, which keeps
evaluation cheap and free of loader overhead in every trial.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from autocompress.errors import InputError

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass
class Split:
    images: torch.Tensor  # N x C x H x W, float32, normalized
    labels: torch.Tensor  # N, int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "Split":
        return self if n is None or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


def read_idx(path: Path, field: str = "data.path") -> torch.Tensor:
    """Read one IDX file (optionally gzipped) into a uint8 tensor."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise InputError(field, f"missing {path.name}[.gz] in {path.parent}")
    try:
        opener = gzip.open if found.suffix == ".gz" else open
        with opener(found, "rb") as fh:
            raw = fh.read()
        magic = struct.unpack(">I", raw[:4])[0]
        if magic >> 8 != 0x08:  # 0x08: unsigned byte data
            raise ValueError(f"magic {magic:#x} is not an unsigned-byte IDX file")
        ndim = magic & 0xFF
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        expected = 4 + 4 * ndim
        count = 1
        for s in shape:
            count *= s
        if len(raw) != expected + count:
            raise ValueError(f"expected {count} values for shape {shape}, file has {len(raw) - expected}")
        data = torch.frombuffer(bytearray(raw[expected:]), dtype=torch.uint8).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as exc:
        raise InputError(field, f"corrupt IDX file {found} ({exc})") from None
    return data


def load_fashion_mnist(path: str | Path, val_size: int = 5000, seed: int = 0, field: str = "data.path") -> Dataset:
    root = Path(path)
    if not root.is_dir():
        raise InputError(
            field, f"no Fashion-MNIST folder at {root} (install Debian's dataset-fashion-mnist or set data.path)"
        )
    raw = {key: read_idx(root / name, field) for key, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        if raw[f"{split}_images"].shape[0] != raw[f"{split}_labels"].shape[0]:
            raise InputError(field, f"{split} images and labels differ in count in {root}")
    train = _normalize(raw["train_images"]), raw["train_labels"].long()
    test = Split(_normalize(raw["test_images"]), raw["test_labels"].long())
    if not 0 < val_size < len(train[1]):
        raise InputError("data.val_size", f"must be between 1 and {len(train[1]) - 1}")
    return _carve(train, test, val_size, seed, FASHION_MNIST_CLASSES)


def load_image_folder(
    path: str | Path, image_size: int, channels: int, val_size: int, seed: int = 0, field: str = "data.path"
) -> Dataset:
    """``path/train/<class>/*`` and ``path/test/<class>/*`` (optionally ``path/val``), loaded into memory."""
    from torchvision import datasets, transforms

    root = Path(path)
    for sub in ("train", "test"):
        if not (root / sub).is_dir():
            raise InputError(field, f"image folder {root} needs '{sub}/<class>/' subfolders")
    tf = [transforms.Resize((image_size, image_size))]
    if channels == 1:
        tf.append(transforms.Grayscale(1))
    tf += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    transform = transforms.Compose(tf)

    def load(sub: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            folder = datasets.ImageFolder(str(root / sub), transform=transform)
            pairs = [folder[i] for i in range(len(folder))]
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(field, f"cannot read images under {root / sub} ({exc})") from None
        if not pairs:
            raise InputError(field, f"no images under {root / sub}")
        images = torch.stack([p[0] for p in pairs])
        labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return images, labels, list(folder.classes)

    train_images, train_labels, classes = load("train")
    test_images, test_labels, test_classes = load("test")
    if test_classes != classes:
        raise InputError(field, f"train and test class folders differ in {root}")
    test = Split(test_images, test_labels)
    if (root / "val").is_dir():
        val_images, val_labels, _ = load("val")
        return Dataset(Split(train_images, train_labels), Split(val_images, val_labels), test, tuple(classes))
    if not 0 < val_size < len(train_labels):
        val_size = max(1, len(train_labels) // 10)
    return _carve((train_images, train_labels), test, val_size, seed, tuple(classes))


def _normalize(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x.unsqueeze(1) if x.dim() == 3 else x


def _carve(
    train: tuple[torch.Tensor, torch.Tensor], test: Split, val_size: int, seed: int, classes: tuple[str, ...]
) -> Dataset:
    images, labels = train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return Dataset(
        Split(images[train_idx], labels[train_idx]), Split(images[val_idx], labels[val_idx]), test, classes
    )
