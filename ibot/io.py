"""Checkpoint file I/O: atomic, checksummed writes, safe (``weights_only``) loads, :class:`CheckpointError`.

The lowest layer: it imports nothing from ibot, so every layer above may use it.

A checkpoint written here ends with a trailer line ``IBOT-SHA256 <hex>`` holding the SHA-256 of the
bytes before it (``torch.load`` ignores bytes after the zip archive, so the file stays a plain
PyTorch checkpoint). :func:`load_safe` verifies it: torch does not check the zip CRCs, so a file with
overwritten bytes would otherwise load silently with garbage weights. Files without a trailer
(official checkpoints, older ibot files) load unverified.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

import torch

SAFE_GLOBALS = [argparse.Namespace]  # official checkpoints pickle their ``args`` namespace
TRAILER = b"\nIBOT-SHA256 "
_TRAILER_LEN = len(TRAILER) + 64 + 1  # marker, hex digest, newline
# what torch.save raises (RuntimeError, not OSError) when a write fails, e.g. on a full disk
_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space left")


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


class _HashingWriter:
    """File-like object for ``torch.save``: writes through to ``f`` and hashes every byte."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_atomic` keeps the checkpoint before the newest: ``checkpoint.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_atomic(obj, path: str | Path, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn
    file; a full disk or a read-only folder raises :class:`CheckpointError` and leaves the previous
    checkpoint intact. ``keep_previous`` first renames the old ``path`` to :func:`previous_path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.write(TRAILER + writer.sha.hexdigest().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a checkpoint is an ordinary file
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in _WRITE_FAILURES):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:120]
        if isinstance(err, RuntimeError):
            reason = f"the write failed ({reason}; is the disk full?)"
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; the previous checkpoint is kept. "
            "Free space or point run.output_dir to a writable folder, then resume."
        ) from err
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete half-written ``.*.tmp`` files a killed writer left behind; returns how many.

    Call it only while holding the run folder's lock (:mod:`ibot.train.runlock`): another run's
    temporary file may be mid-write otherwise.
    """
    stale = list(Path(folder).glob(".*.pth.*.tmp")) if Path(folder).is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def verify_checksum(path: str | Path) -> bool | None:
    """True when the trailer's SHA-256 matches, False when it does not, None when there is no trailer."""
    path = Path(path)
    size = path.stat().st_size
    if size < _TRAILER_LEN:
        return None
    with open(path, "rb") as f:
        f.seek(size - _TRAILER_LEN)
        tail = f.read()
        if not tail.startswith(TRAILER) or not tail.endswith(b"\n"):
            return None
        expected = tail[len(TRAILER) : -1].decode("ascii", "replace")
        f.seek(0)
        sha, left = hashlib.sha256(), size - _TRAILER_LEN
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                return False
            sha.update(chunk)
            left -= len(chunk)
    return sha.hexdigest() == expected


def load_safe(path: str | Path, allow_unsafe: bool = False, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` and a small allow-list, after verifying the checksum
    (``.safetensors``: its tensors).

    A file that needs arbitrary unpickling is refused unless ``allow_unsafe`` (only for files you
    trust: unpickling can run code). A corrupt or foreign file is reported as such, never with advice
    to load it unsafely.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}")
    if path.suffix == ".safetensors":  # a flat tensor dict (e.g. timm weights): nothing to unpickle
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any malformed file
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(err)[:160]})") from err
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip archive / legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (corrupt, empty or another format)")
    if verify_checksum(path) is False:
        raise CheckpointError(
            f"{path} is corrupt (its SHA-256 does not match the one written with it); "
            f"use {previous_path(path).name} or an older checkpoint"
        )
    if allow_unsafe:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable"
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable"
        msg = str(err)
        if "Unsupported global" in msg:
            glob = next((ln.strip() for ln in msg.splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(
                f"{path} contains Python objects that safe loading refuses ({glob[:200]}). "
                "If you trust the file, pass --allow-unsafe-pickle."
            ) from err
        first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {first[:160]}); it is corrupt or truncated"
        ) from err
