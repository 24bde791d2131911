"""A run's inputs, read from its config: the data, the trained model, the example batch it is timed on and the
search space file. The search, ``apply``, ``export`` and ``profile`` all start here."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from autocompress.config import RunConfig
from autocompress.data import Dataset, load_fashion_mnist, load_image_folder
from autocompress.errors import InputError
from autocompress.models import create_model, load_checkpoint
from autocompress.space import SearchSpace, is_space_path

__all__ = ["example_batch", "load_data", "load_model", "load_space", "space_location"]


def load_data(config: RunConfig) -> Dataset:
    d = config.data
    path = config.resolve_path(d.path)
    field_name = f"{config.source}.data.path"
    if d.kind == "fashion_mnist":
        return load_fashion_mnist(path, d.val_size, d.seed, field=field_name)
    return load_image_folder(path, d.image_size, d.channels, d.val_size, d.seed, field=field_name)


def load_model(config: RunConfig, data: Dataset, log: Callable[[str], None] = print) -> nn.Module:
    m = config.model
    model = create_model(m.name, m.kwargs, field=f"{config.source}.model")
    if m.checkpoint is None:
        raise InputError(f"{config.source}.model.checkpoint", "a local checkpoint is required (nothing is downloaded)")
    path = config.resolve_path(m.checkpoint)
    if not path.exists() and m.train_if_missing is not None:
        from autocompress.train import train_base  # the training loop (and tqdm), only when there is no checkpoint

        log(f"base checkpoint {path} is missing: training it once (model.train_if_missing) ...")
        train_base(model, data, path, **m.train_if_missing)
    return load_checkpoint(model, path, field=f"{config.source}.model.checkpoint")


def example_batch(data: Dataset, batch_size: int) -> torch.Tensor:
    images = data.val.images
    reps = -(-batch_size // len(images))
    return images.repeat(reps, *([1] * (images.dim() - 1)))[:batch_size].contiguous()


def space_location(config: RunConfig) -> str:
    """The config's space: a path, taken from the config file's folder, or a builtin name (``vit``) as it is."""
    return str(config.resolve_path(config.space)) if is_space_path(config.space) else config.space


def load_space(config: RunConfig) -> SearchSpace:
    return SearchSpace.load(space_location(config))
