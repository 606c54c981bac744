"""Which device a command runs on, and the autocast its inference uses there.

Every command takes ``--device`` (``auto``: the first CUDA device when there is one, else the CPU).
Inference on CUDA runs under bf16 autocast (features are returned in fp32); on the CPU it stays fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message says what to use instead."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` / ``None`` -> CUDA when available, else CPU; ``cuda``, ``cuda:1``, ``cpu`` as given."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {str(name)!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(name)!r} was asked for but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(name)!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif dev.type != "cpu":
        raise DeviceError(f"device type {dev.type!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def inference_autocast(device: torch.device | str):
    """bf16 autocast on CUDA, nothing on the CPU (the context feature extraction runs under)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


__all__ = ["DeviceError", "inference_autocast", "resolve_device"]
