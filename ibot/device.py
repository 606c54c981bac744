"""Which device a command runs on, and the precision / autocast it uses there.

Every command takes ``--device`` (``auto``: the first CUDA device when there is one, else the CPU);
``ibot pretrain`` takes ``run.device`` and ``run.precision`` (:func:`training_device`,
:func:`resolve_precision`). Inference on CUDA runs under bf16 autocast (features are returned in
fp32); on the CPU it stays fp32.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message says what to use instead."""


def resolve_device(name: str | torch.device | None = "auto", option: str = "--device") -> torch.device:
    """``auto`` / ``None`` -> CUDA when available, else CPU; ``cuda``, ``cuda:1``, ``cpu`` as given.

    ``option``: the setting the error messages advise changing (``--device``, ``run.device``).
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {str(name)!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            cpu = f"{option}=cpu" if option.startswith("run.") else f"{option} cpu"
            raise DeviceError(f"device {str(name)!r} was asked for but no CUDA device is available; use {cpu}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(name)!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif dev.type != "cpu":
        raise DeviceError(f"device type {dev.type!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def training_device(name: str, distributed: bool = False) -> torch.device:
    """``run.device`` of a training process (:func:`resolve_device`); ``distributed`` on CUDA: this
    process's GPU (``LOCAL_RANK`` under torchrun), made the current device."""
    dev = resolve_device(name, option="run.device")
    if dev.type == "cuda" and distributed:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``run.precision``: ``auto`` -> bf16 on CUDA, fp32 on the CPU; fp32, bf16, fp16 as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def inference_autocast(device: torch.device | str):
    """bf16 autocast on CUDA, nothing on the CPU (the context feature extraction runs under)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


__all__ = ["DeviceError", "inference_autocast", "resolve_device", "resolve_precision", "training_device"]
