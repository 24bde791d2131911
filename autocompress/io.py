"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file autocompress writes goes through :func:`atomic_write` (a test scans the package for other writers). The
data go to a hidden temporary file in the same folder, are flushed to disk, and the temporary file is renamed over
the target (``os.replace`` is atomic on POSIX and Windows). A process killed mid-write (``kill -9``, Ctrl-C, a full
disk) leaves the previous file intact. The temporary file keeps the target's extensions, so writers that pick a
format from the name (``savefig``, ``to_csv`` with compression) behave as for the target, and it gets the usual
permissions (``0666 & ~umask``) rather than ``mkstemp``'s private ``0600``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save", "atomic_write_csv"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then put it at ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes[-2:]), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # the data reach the disk before the name points at them
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_csv(path: Path, frame: Any) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
