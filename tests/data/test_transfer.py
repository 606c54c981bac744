"""Transfer path of training batches: pinning, device batches, prefetch bound, epoch-aware workers."""

import pytest
import torch

from ibot.builders.data import resolve_pipeline
from ibot.config import build_config
from ibot.data.device_augment import DeviceAugment
from ibot.data.loader import Batch, EpochSampler, MultiCropCollate, MultiCropDataset
from ibot.data.masking import MaskBatch, MaskGenerator
from ibot.data.prefetch import DeviceBatches, batch_bytes, prefetch_factor
from ibot.data.transforms import AugmentSpec
from ibot.train.trainer import Trainer


def _batch(b=4, dtype=torch.uint8):
    masks = MaskBatch.from_masks(torch.rand(2 * b, 16) < 0.3, 2)
    g = torch.randint(0, 256, (2 * b, 3, 16, 16), dtype=torch.uint8).to(dtype)
    loc = torch.randint(0, 256, (3 * b, 3, 8, 8), dtype=torch.uint8).to(dtype)
    return Batch(g, loc, masks, torch.arange(b), 2, 3)


def test_batch_pin_memory_pins_every_tensor(monkeypatch):
    """The plumbing only (a CPU-only build cannot pin; ``test_batch_pin_memory_cuda`` pins for real):
    the DataLoader's pinning thread calls ``Batch.pin_memory``, which pins every tensor and keeps the
    pinned copies (a fake ``Tensor.pin_memory`` returns marked clones)."""
    pinned = {}

    def fake_pin(self, *args, **kwargs):
        copy = self.clone()
        pinned[id(copy)] = copy
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    b = _batch()
    # what DataLoader(pin_memory=True) runs in its pinning thread
    out = torch.utils.data._utils.pin_memory.pin_memory(b)
    assert isinstance(out, Batch) and out is not b
    assert (out.n_global, out.n_local, out.batch_size) == (2, 3, 4)
    assert torch.equal(out.global_crops, b.global_crops) and torch.equal(out.masks.index, b.masks.index)
    tensors = [out.global_crops, out.local_crops, out.labels, out.masks.masks]
    assert all(id(t) in pinned for t in tensors)  # the batch holds the pinned copies, not the originals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_pin_memory_cuda():
    b = _batch()
    out = b.pin_memory()
    assert out.global_crops.is_pinned() and out.local_crops.is_pinned() and out.masks.masks.is_pinned()
    assert out.labels.is_pinned() and not b.global_crops.is_pinned()
    moved = out.to(torch.device("cuda"), non_blocking=True)  # the copy the pinned pages allow
    torch.cuda.synchronize()
    assert torch.equal(moved.global_crops.cpu(), b.global_crops) and torch.equal(moved.masks.masks.cpu(), b.masks.masks)


def test_prefetch_factor_keeps_batches_in_flight_under_the_budget():
    # official ViT-S recipe, batch 128: uint8 crops ~74 MB, fp32 ~296 MB
    u8 = batch_bytes(128, 3, [(2, 224), (10, 96)], 1)
    assert u8 == 128 * 3 * (2 * 224 * 224 + 10 * 96 * 96)
    assert prefetch_factor(10, u8, budget=2 << 30) == 2  # 20 batches, 1.5 GB
    assert prefetch_factor(10, 4 * u8, budget=2 << 30) == 1  # never below 1
    assert prefetch_factor(2, 1000, budget=2 << 30) == 4  # at most 4 (the DataLoader default is 2)
    assert prefetch_factor(0, u8) is None


def test_device_batches_on_cpu_augment_with_the_step_seed():
    aug = DeviceAugment(AugmentSpec(local_crops_number=3))
    batches = [_batch(), _batch()]
    out = list(DeviceBatches(batches, torch.device("cpu"), aug, seed_of=lambda s: 100 + s, start=5))
    assert len(out) == 2 and out[0].global_crops.dtype == torch.float32
    ref = aug(batches[1], torch.Generator().manual_seed(106))
    assert torch.equal(out[1].global_crops, ref.global_crops) and torch.equal(out[1].local_crops, ref.local_crops)
    plain = list(DeviceBatches(batches, torch.device("cpu")))
    assert plain[0].global_crops.dtype == torch.uint8


def test_resolve_pipeline():
    assert resolve_pipeline("auto", True, "cuda") == "tensor"
    assert resolve_pipeline("auto", False, "cuda") == "gpu"
    assert resolve_pipeline("auto", False, "cpu") == "pil"  # CPU numerics unchanged
    assert resolve_pipeline("gpu", True, "cpu") == "gpu"


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        from PIL import Image

        g = torch.Generator().manual_seed(i)
        return Image.fromarray(torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()), i


def _crop_transform(img):  # crop position from torch's generator (seeded per (seed, epoch, index))
    x = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)
    i, j = torch.randint(0, 5, (2,)).tolist()
    return [x[:, i : i + 16, j : j + 16]] * 2


def test_persistent_workers_see_the_new_epoch():
    """The epoch travels with the indices: a persistent worker's dataset and collate copies follow it."""
    gen = MaskGenerator("rand", 0.5, start_epoch=1)  # no masks before epoch 1
    collate = MultiCropCollate(2, 0, 4, gen)
    ds = MultiCropDataset(_Images(), _crop_transform, seed=3)
    sampler = EpochSampler(8, 4, seed=3, epoch=0, with_epoch=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, sampler=sampler, collate_fn=collate, num_workers=1, persistent_workers=True
    )
    e0 = list(loader)
    sampler.set_epoch(1)  # only the main process's sampler changes
    e1 = list(loader)
    assert len(e0) == len(e1) == 2
    assert e0[0].masks.num_masked == 0 and e1[0].masks.num_masked > 0
    ref = torch.utils.data.DataLoader(
        MultiCropDataset(_Images(), _crop_transform, seed=3),
        batch_size=4,
        sampler=EpochSampler(8, 4, seed=3, epoch=1, with_epoch=True),
        collate_fn=MultiCropCollate(2, 0, 4, MaskGenerator("rand", 0.5, start_epoch=1)),
    )
    for a, b in zip(e1, ref, strict=True):
        assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.masks.masks, b.masks.masks)
    assert not torch.equal(e0[0].global_crops, e1[0].global_crops)


def _cfg(tmp_path, *overrides):
    return build_config(
        "smoke",
        [f"run.output_dir={tmp_path}", "run.progress=false", "run.knn_at_end=false", "data.pipeline=gpu", *overrides],
    )


def test_gpu_pipeline_trainer_batches_and_persistent_workers(tmp_path):
    tr = Trainer(_cfg(tmp_path / "w", "data.num_workers=1"), log=lambda *a: None)
    b0 = list(tr.data.batches(0))
    b1 = list(tr.data.batches(1, 1))
    assert len(b0) == 4 and len(b1) == 3
    assert b0[0].global_crops.dtype == torch.float32 and b0[0].global_crops.shape == (32, 3, 32, 32)
    assert b0[0].local_crops.shape == (32, 3, 16, 16) and b0[0].masks.masks.shape == (32, 16)
    assert tr.data.loader.persistent_workers and tr.data.loader.prefetch_factor == 4
    raw = next(iter(tr.data.loader))  # what the workers send: uint8 crops (4x less than float32)
    assert raw.global_crops.dtype == raw.local_crops.dtype == torch.uint8
    ref = list(Trainer(_cfg(tmp_path / "r", "data.num_workers=0"), log=lambda *a: None).data.batches(1, 1))
    for a, b in zip(b1, ref, strict=True):  # same batches with or without (persistent) workers
        assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)
        assert torch.equal(a.masks.masks, b.masks.masks)


def test_gpu_pipeline_resume_gives_the_same_losses(tmp_path):
    import json

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    Trainer(_cfg(tmp_path / "full", "run.max_steps=6"), log=lambda *a: None).fit()
    Trainer(_cfg(tmp_path / "part", "run.max_steps=3"), log=lambda *a: None).fit()
    Trainer(_cfg(tmp_path / "part", "run.max_steps=6"), log=lambda *a: None).fit()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batches_cuda_side_stream_equals_the_cpu_path():
    aug = DeviceAugment(AugmentSpec(local_crops_number=3))
    batches = [_batch(8) for _ in range(3)]
    pinned = [b.pin_memory() for b in batches]
    gpu = [b for b in DeviceBatches(pinned, torch.device("cuda"), aug, seed_of=lambda s: s)]
    cpu = list(DeviceBatches(batches, torch.device("cpu"), aug, seed_of=lambda s: s))
    for g, c in zip(gpu, cpu, strict=True):
        assert g.global_crops.is_cuda and g.masks.index.is_cuda
        torch.testing.assert_close(g.global_crops.cpu(), c.global_crops, atol=1e-4, rtol=0)
        torch.testing.assert_close(g.local_crops.cpu(), c.local_crops, atol=1e-4, rtol=0)
        assert torch.equal(g.masks.masks.cpu(), c.masks.masks)


def test_worker_collate_writes_crops_into_shared_memory():
    from ibot.data.loader import stack_shared

    parts = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(5)]
    assert not stack_shared(parts).is_shared()  # main process: a plain stack

    class Stacks(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            out = stack_shared(parts)
            return out.is_shared(), out

    ((shared, out),) = list(torch.utils.data.DataLoader(Stacks(), batch_size=None, num_workers=1))
    assert shared and torch.equal(out, torch.stack(parts))
