"""Atomic checkpoint writes and safe (``weights_only``) loads."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

SAFE_GLOBALS = [argparse.Namespace]  # official checkpoints pickle their ``args`` namespace


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 minus the process umask (0644 under umask 022)."""
    try:  # Linux: read the umask without changing it (os.umask would, for a moment, for every thread)
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def save_atomic(obj, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn
    file; a full disk raises :class:`CheckpointError` and leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {err}; the previous checkpoint is kept") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete half-written ``.*.tmp`` files a killed writer left behind; returns how many."""
    stale = list(Path(folder).glob(".*.pth.*.tmp")) if Path(folder).is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def load_safe(path: str | Path, allow_unsafe: bool = False, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` and a small allow-list (``.safetensors``: its tensors).

    A file that needs arbitrary unpickling is refused unless ``allow_unsafe`` (only for files you
    trust: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":  # a flat tensor dict (e.g. timm weights): nothing to unpickle
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    if allow_unsafe:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} contains Python objects that safe loading refuses ({str(err).splitlines()[0][:200]}). "
                "If you trust the file, pass --allow-unsafe-pickle."
            ) from err
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
