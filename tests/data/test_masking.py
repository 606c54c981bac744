import random

import numpy as np
import pytest
import torch

from ibot.data.masking import MaskBatch, MaskGenerator, block_mask, random_mask, random_masks_torch, sample_masks


def test_block_masks_average_about_57_of_196_and_never_exceed():
    rng = random.Random(0)
    target = 0.3 * 196
    counts = [block_mask(14, 14, target, rng).sum() for _ in range(2000)]
    assert max(counts) <= target
    assert 55.5 <= np.mean(counts) <= 58.0  # official: 57.1 on average


def test_random_masks_hit_int_target_exactly():
    rng = random.Random(0)
    for ratio in (0.1, 0.3, 0.45):
        assert random_mask(14, 14, ratio * 196, rng).sum() == int(ratio * 196)
    m = random_masks_torch(50, 196, torch.full((50,), 0.3))
    assert (m.sum(1) == int(0.3 * 196)).all()


def test_pred_ratio_pairs_give_official_empty_fraction():
    gen = MaskGenerator("block", ratio=[0.0, 0.3], ratio_var=[0.0, 0.2])
    rng = random.Random(1)
    masks = gen(4000, 14, 14, rng)
    counts = masks.flatten(1).sum(1).float()
    empty = (counts == 0).float().mean().item()
    assert 0.47 <= empty <= 0.55  # official: ~51% empty
    assert counts.max() <= 0.5 * 196
    assert 25 <= counts.mean() <= 31  # official: mean 28.3
    # pred_ratio_var spreads the non-empty masks: ratio ~ U(0.1, 0.5), so counts have std
    # 0.4 / sqrt(12) * 196 = 22.6 and reach ~98 (without the variance: std ~1.2, max 58)
    filled = counts[counts > 0]
    assert 20 <= filled.std() <= 25
    assert filled.max() >= 0.45 * 196 and filled.min() <= 0.15 * 196
    ratios = gen.sample_ratios(20000, torch.Generator().manual_seed(0))
    assert 0.48 <= (ratios == 0).double().mean() <= 0.52
    drawn = ratios[ratios > 0]
    assert 0.1 <= drawn.min() < 0.11 and 0.49 < drawn.max() <= 0.5
    assert drawn.std() == pytest.approx(0.4 / 12**0.5, rel=0.03)


def test_start_epoch_and_probability():
    gen = MaskGenerator("rand", 0.3, start_epoch=2, probability=0.5)
    assert gen(10, 4, 4, random.Random(0), epoch=1).sum() == 0  # the epoch is an argument, not a state
    assert sample_masks(gen, 10, (4, 4), torch.Generator().manual_seed(0), epoch=1).sum() == 0
    frac = (gen(4000, 4, 4, random.Random(0), epoch=2).flatten(1).sum(1) > 0).float().mean()
    assert 0.45 <= frac <= 0.55
    with pytest.raises(ValueError, match="leaves"):
        MaskGenerator("block", 0.3, 0.4)
    with pytest.raises(ValueError, match="unknown mask shape"):
        MaskGenerator("grid")


def test_mask_batch_indices_and_weights():
    masks = [
        torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool),
        torch.tensor([[[1, 1], [0, 1]], [[0, 1], [0, 0]]], dtype=torch.bool),
    ]
    mb = MaskBatch.from_masks(masks)
    assert mb.masks.shape == (4, 4) and mb.n_global == 2
    assert mb.index.tolist() == [0, 8, 9, 11, 13]
    # weight = 1 / (count * B * G)
    torch.testing.assert_close(mb.weight, torch.tensor([1 / 4, 1 / 12, 1 / 12, 1 / 12, 1 / 4]))


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_sample_masks_is_seeded_by_the_torch_generator(shape):
    gen = MaskGenerator(shape, 0.4)
    a = sample_masks(gen, 6, (4, 5), torch.Generator().manual_seed(1))
    b = sample_masks(gen, 6, (4, 5), torch.Generator().manual_seed(1))
    assert a.shape == (6, 4, 5) and a.any() and torch.equal(a, b)
    assert not torch.equal(a, sample_masks(gen, 6, (4, 5), torch.Generator().manual_seed(2)))


def test_the_model_and_the_collate_get_one_mask_configuration():
    """The model samples masks (calls without masks) with the collate's settings, min_patches included."""
    from ibot.builders.data import collate_from_config
    from ibot.builders.model import build_model
    from ibot.config import build_config

    cfg = build_config("smoke", ["mask.min_patches=2", "mask.start_epoch=1"])
    model, collate = build_model(cfg), collate_from_config(cfg)
    a, b = model.mask_generator, collate.mask_generator
    assert vars(a) == vars(b) and a.min_patches == 2 and a.start_epoch == 1
    assert collate.mask_cell == model.student["backbone"].mask_cell
