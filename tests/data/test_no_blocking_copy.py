"""Issue 25: no blocking host -> device copy in the device half of ``data.pipeline=gpu`` or in the
Sinkhorn-Knopp targets. Counted on the CPU by recording every ``Tensor.to`` that names a device: a
copy that waits (``non_blocking=False``) or a constant made again for every batch would show here
as it would on a GPU, where ``benchmarks/gpu_check.py`` runs the steps under
``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import dataclasses

import torch

from ibot.data.device_augment import DeviceAugment, to_device
from ibot.data.loader import Batch
from ibot.data.transforms import AugmentSpec
from ibot.losses.teacher import sinkhorn_knopp


def _record_copies(monkeypatch) -> list:
    """(shape, non_blocking) of every ``Tensor.to`` given a device."""
    calls, real = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (torch.device, str)):
            calls.append((tuple(self.shape), kwargs.get("non_blocking", False)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def _batch(seed: int, b: int = 4) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(0, 256, (2 * b, 3, 16, 16), dtype=torch.uint8, generator=gen)
    loc = torch.randint(0, 256, (2 * b, 3, 8, 8), dtype=torch.uint8, generator=gen)
    return Batch(g, loc, None, torch.arange(b), 2, 2)


def test_device_half_never_waits_on_a_copy_and_makes_its_constants_once(monkeypatch):
    # every operation on, so each of its copies happens
    spec = AugmentSpec(local_crops_number=2, color_jitter_p=1.0, grayscale_p=0.5, blur_p=(1.0, 1.0, 1.0))
    aug = DeviceAugment(dataclasses.replace(spec, solarization_p=1.0))
    calls = _record_copies(monkeypatch)
    aug(_batch(0), torch.Generator().manual_seed(0))
    first = list(calls)
    calls.clear()
    aug(_batch(1), torch.Generator().manual_seed(1))
    assert first and calls
    assert all(nb for _, nb in first + calls), first + calls  # before: the mean / std copies waited
    norm = [c for c in first + calls if c[0] == (1, 3, 1, 1)]
    assert len(norm) == 2 and all(c[0] != (1, 3, 1, 1) for c in calls)  # made in the first batch only
    assert aug.normalizer(torch.device("cpu"))[0] is aug.normalizer(torch.device("cpu"))[0]


def test_to_device_pins_then_copies_without_waiting(monkeypatch):
    """On CUDA the host tensor is pinned first (a copy from pageable memory waits for the stream)."""
    log = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: log.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, d, non_blocking=False: log.append((str(d), non_blocking)))
    to_device(torch.ones(2), torch.device("cuda"))
    assert log == ["pin", ("cuda", True)]
    log.clear()
    to_device(torch.ones(2), torch.device("cpu"))
    assert log == [("cpu", True)]


def test_sinkhorn_builds_no_host_tensor_per_call(monkeypatch):
    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    want = sinkhorn_knopp(logits, 0.05)
    made, real = [], torch.tensor

    def tensor(*a, **k):
        made.append(k.get("device"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    got = sinkhorn_knopp(logits, 0.05)
    assert made == []  # before: torch.tensor([R], device=...) per call, a blocking copy on a GPU
    assert torch.equal(got, want)
    torch.testing.assert_close(got.sum(1), torch.ones(12))
