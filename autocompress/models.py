"""Models: a timm architecture by name plus weights from a local checkpoint. Nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import InputError


def create_model(name: str, kwargs: dict[str, Any] | None = None, field: str = "model") -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise InputError(f"{field}.name", f"unknown timm model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=False, **(kwargs or {}))
    except TypeError as exc:
        raise InputError(f"{field}.kwargs", f"not accepted by {name}: {exc}") from None
    return model.eval()


def load_checkpoint(model: nn.Module, path: str | Path, field: str = "model.checkpoint") -> nn.Module:
    """Load weights into ``model``: safetensors, or a torch file read with ``weights_only=True``.

    A torch file may hold the state dict itself or ``{"state_dict": ...}`` / ``{"model": ...}``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(field, f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as exc:  # truncated or corrupt
            raise InputError(field, f"cannot read checkpoint {path} ({type(exc).__name__}: {_first_line(exc)})") from None
    else:
        state = safe_torch_load(path, field)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(field, f"{path} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(field, f"{path} does not fit the model architecture ({_first_line(exc, 160)})") from None
    return model.eval()


def safe_torch_load(path: Path, field: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.

    A file that carries other Python objects is refused with the global it names, and the message does not suggest
    ``weights_only=False`` (torch's own text does): running code from a checkpoint is never the fix.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise InputError(
            field, f"refused {path}: it holds pickled Python objects{what}, not only tensors (loaded with weights_only=True)"
        ) from None
    except Exception as exc:  # truncated, corrupt, not a torch file
        raise InputError(field, f"cannot read checkpoint {path} ({type(exc).__name__}: {_first_line(exc)})") from None


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    from autocompress.io import atomic_torch_save

    atomic_torch_save({"state_dict": model.state_dict()}, Path(path))


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
