"""Seeding of crops and masks, as docs/distributed.md and ibot/data/loader.py describe it."""

import torch

from ibot.data.datasets import synthetic_dataset
from ibot.data.loader import EpochSampler, MultiCropCollate, MultiCropDataset, TensorBatches
from ibot.data.masking import MaskGenerator
from ibot.data.transforms import AugmentSpec, BatchMultiCrop, MultiCropTransform


def _collate(seed=0):
    return MultiCropCollate(2, 0, 8, MaskGenerator("rand", 0.5), seed=seed)


def _tensor_batches(rank, world, start=0, seed=0, epoch=0):
    ds = synthetic_dataset(64, 32)
    sampler = EpochSampler(len(ds), 8, seed, epoch, rank, world, start)
    return TensorBatches(
        ds.images,
        ds.labels,
        sampler,
        BatchMultiCrop(AugmentSpec(2, 32, (0.4, 1.0), 0, mean=(0.5,), std=(0.5,), blur_scale=0.25)),
        _collate(seed),  # the epoch is the sampler's
    )


def test_tensor_path_seeds_by_seed_epoch_rank_step():
    first = list(_tensor_batches(0, 2))
    resumed = list(_tensor_batches(0, 2, start=2))  # the same (rank, step) after a resume
    for a, b in zip(first[2:], resumed, strict=True):
        assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.masks.masks, b.masks.masks)
    other_rank = list(_tensor_batches(1, 2))
    assert not torch.equal(first[0].masks.masks, other_rank[0].masks.masks)
    assert not torch.equal(first[0].masks.masks, first[1].masks.masks)  # another step
    other_epoch = list(_tensor_batches(0, 2, epoch=1))
    assert not torch.equal(first[0].masks.masks, other_epoch[0].masks.masks)


def test_pil_path_seeds_crops_by_image_and_masks_by_first_image():
    ds = synthetic_dataset(8, 32)
    mc = MultiCropDataset(ds, MultiCropTransform(AugmentSpec(2, 32, (0.4, 1.0), 0)), seed=0)
    item = mc[3]
    assert item[3] == 0 and all(torch.equal(a, b) for a, b in zip(mc[(0, 3)][0], item[0], strict=True))
    assert not torch.equal(mc[(1, 3)][0][0], item[0][0])  # the epoch comes with the key (the sampler's)
    collate = _collate()
    a = collate([mc[3], mc[5]])
    b = collate([mc[3], mc[6]])  # same first image: same masks, whatever the rest of the batch
    c = collate([mc[4], mc[5]])
    assert torch.equal(a.masks.masks, b.masks.masks)
    assert not torch.equal(a.masks.masks, c.masks.masks)


def test_the_collate_takes_the_epoch_from_the_samples():
    ds = synthetic_dataset(8, 32)
    mc = MultiCropDataset(ds, MultiCropTransform(AugmentSpec(2, 32, (0.4, 1.0), 0)), seed=0)
    collate = MultiCropCollate(2, 0, 8, MaskGenerator("rand", 0.5, start_epoch=1))
    assert not collate([mc[(0, 3)], mc[(0, 5)]]).masks.masks.any()  # before the mask start
    late = collate([mc[(1, 3)], mc[(1, 5)]]).masks.masks
    assert late.any() and not torch.equal(late, collate([mc[(2, 3)], mc[(2, 5)]]).masks.masks)
    sampler = EpochSampler(8, 2, seed=0, epoch=0, with_epoch=True)
    sampler.set_epoch(3)
    assert {e for e, _ in sampler} == {3}


def test_per_image_seeding_leaves_the_cuda_generators_alone(monkeypatch):
    """Issue 25 item 9: with the workers in the main process (num_workers=0) on CUDA, seeding each image
    with ``torch.manual_seed`` also reset the CUDA generators (drop path's) to the image's seed. The
    crops are seeded on the CPU generator only (forked around it, so the caller's CPU stream goes on)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    ds = synthetic_dataset(8, 32)
    mc = MultiCropDataset(ds, MultiCropTransform(AugmentSpec(2, 32, (0.4, 1.0), 0)), seed=0)
    torch.manual_seed(123)
    reseeded.clear()
    expected_next = torch.get_rng_state()
    first = mc[3]
    assert reseeded == []  # no CUDA generator touched
    assert torch.equal(torch.get_rng_state(), expected_next)  # the CPU stream restored
    assert all(torch.equal(a, b) for a, b in zip(first[0], mc[3][0], strict=True))  # still seeded per image
