"""The device pipeline (data.pipeline=gpu) against the PIL recipe: same distribution on the same crops.

Every comparison feeds the same uint8 crops (made by the worker half, CropFlip) to the official PIL
post-crop transforms (ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, RandomGrayscale 0.2, GaussianBlur,
Solarization, normalise) and to DeviceAugment on the CPU, many times, and compares statistics of
the outputs. Each statistical test also checks that a wrong recipe would have failed it.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ibot.data.device_augment import AugmentParams, CropFlip, DeviceAugment, adjust_hue, gaussian_blur
from ibot.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, GaussianBlur, Solarization

KINDS = {"global1": 0, "global2": 1, "local": 2}
BLUR_P = (1.0, 0.1, 0.5)


def natural_images(n=24, size=64, seed=0):
    """Colourful smooth images with edges and texture (uint8 PIL RGB)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        base = torch.rand(3, 1, 1, generator=g)
        grad = torch.rand(3, 1, 1, generator=g) * xx + torch.rand(3, 1, 1, generator=g) * yy
        img = 0.5 * base + 0.35 * grad
        cx, cy, r = (float(v) for v in torch.rand(3, generator=g))
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < (0.1 + 0.3 * r) ** 2).float()
        img = img * (1 - blob) + blob * torch.rand(3, 1, 1, generator=g)
        img = (img + 0.06 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
        arr = (img * 255).round().byte().permute(1, 2, 0).numpy()
        out.append(Image.fromarray(arr, "RGB"))
    return out


def same_crops(n_repeat=60, size=24, seed=0):
    """(N, 3, size, size) uint8 crops from the worker half."""
    torch.manual_seed(seed)
    cf = CropFlip(AugmentSpec(1, size, (0.3, 1.0), 0, in_chans=3))
    return torch.stack([cf(img)[0] for img in natural_images() for _ in range(n_repeat // 10)] * 10)


def pil_reference(kind, jitter_p=0.8, gray_p=0.2, blur=True, solarize_p=0.2):
    """The official post-crop transforms of a crop kind (after crop + flip), on PIL images."""
    ops = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=jitter_p), T.RandomGrayscale(p=gray_p)]
    if blur:
        ops.append(GaussianBlur(BLUR_P[KINDS[kind]]))
    if kind == "global2":
        ops.append(Solarization(solarize_p))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def run_pil(crops, kind, seed=0, **kw):
    torch.manual_seed(seed)
    import random

    random.seed(seed)
    tf = pil_reference(kind, **kw)
    return torch.stack([tf(Image.fromarray(c.permute(1, 2, 0).numpy(), "RGB")) for c in crops])


def run_device(crops, kind, seed=0, jitter_p=0.8, gray_p=0.2, blur=True, solarize_p=0.2, **kw):
    blur_p = BLUR_P if blur else (0, 0, 0)
    spec = AugmentSpec(color_jitter_p=jitter_p, grayscale_p=gray_p, blur_p=blur_p, solarization_p=solarize_p, **kw)
    aug = DeviceAugment(spec)
    kinds = torch.full((crops.shape[0],), KINDS[kind], dtype=torch.long)
    return aug.apply(crops, aug.sample(kinds, torch.Generator().manual_seed(seed)))


def unnormalise(x):
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def hsv(x):
    """(N, 3, H, W) in [0, 1] -> hue (turns), saturation, value."""
    maxc, minc = x.amax(1), x.amin(1)
    c = maxc - minc
    safe = torch.where(c > 0, c, torch.ones_like(c))
    r, g, b = x.unbind(1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.remainder(h / 6, 1.0), c / maxc.clamp_min(1e-6), maxc


def is_gray(x):
    x = unnormalise(x)
    return (x.amax(1) - x.amin(1)).amax(dim=(-2, -1)) < 1.5 / 255


def sharpness(x):
    """Mean absolute difference of horizontal neighbours, per crop."""
    return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------- exact operations


def test_hue_matches_torchvision():
    x = torch.rand(6, 3, 17, 19, generator=torch.Generator().manual_seed(0))
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.07, 0.1])
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(adjust_hue(x, shifts), ref, atol=2e-5, rtol=0)


def test_jitter_ops_and_order_match_torchvision():
    """Each row's four adjustments, in that row's order, as torchvision's functional ops on tensors."""
    aug = DeviceAugment(AugmentSpec(grayscale_p=0.0, blur_p=(0, 0, 0), solarization_p=0.0))
    x8 = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    factor = torch.tensor([[1.3, 0.7, 1.15, 0.08], [0.65, 1.35, 0.85, -0.09], [1.1, 1.2, 0.9, 0.05]])
    off = torch.zeros(3, dtype=torch.bool)
    p = AugmentParams(order, factor, off, off, torch.ones(3), off)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for i in range(3):
        y = x8[i].float() / 255
        for op in order[i].tolist():
            y = fns[op](y, float(factor[i, op]))
        ref.append(TF.normalize(y, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(aug.apply(x8, p), torch.stack(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.7, 1.2, 2.0])
def test_blur_matches_pil_gaussian_blur(sigma):
    """PIL blurs with three extended box filters of total variance sigma^2 (not a sampled Gaussian)."""
    from PIL import ImageFilter

    x = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = Image.fromarray(x[0].permute(1, 2, 0).numpy(), "RGB").filter(ImageFilter.GaussianBlur(radius=sigma))
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float()
    y = gaussian_blur(x.float(), torch.tensor([sigma]), 2.0)[0]
    # PIL rounds to uint8 after each of its six 1-D passes; compare inside (PIL replicates edges per pass)
    diff = (y - ref)[:, 6:-6, 6:-6]
    assert diff.abs().mean() < 1.1 and diff.abs().max() < 3.5 and abs(diff.mean()) < 0.05
    if sigma >= 0.3:  # how much the blur changes the image (below, PIL's rounding undoes most of it)
        change, change_pil = (y - x[0]).abs().mean(), (ref - x[0]).abs().mean()
        assert abs(change / change_pil - 1) < 0.02


def test_same_generator_same_output_and_every_order_drawn():
    crops = same_crops(10)
    a = run_device(crops, "global2", seed=3)
    assert torch.equal(a, run_device(crops, "global2", seed=3))
    assert not torch.equal(a, run_device(crops, "global2", seed=4))
    aug = DeviceAugment(AugmentSpec())
    order = aug.sample(torch.zeros(24000, dtype=torch.long), torch.Generator().manual_seed(0)).order
    perms, counts = torch.unique(order, dim=0, return_counts=True)
    assert perms.shape[0] == 24 and counts.min() > 850 and counts.max() < 1150  # 1000 each expected


def test_crop_flip_returns_uint8_crops_of_the_configured_sizes():
    torch.manual_seed(0)
    crops = CropFlip(AugmentSpec(2, 32, (0.3, 1.0), 3, 16, (0.05, 0.3)))(natural_images(1)[0])
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.uint8 for c in crops)
    gray = CropFlip(AugmentSpec(1, 8, (0.5, 1.0), in_chans=1))(natural_images(1)[0])
    assert gray[0].shape == (1, 8, 8)


def test_crop_flip_flips_half_the_crops():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")  # left dark, right bright
    cf = CropFlip(AugmentSpec(1, 16, (0.99, 1.0), in_chans=1))
    torch.manual_seed(0)
    flipped = [bool(c[0][0, 0, 0] > c[0][0, 0, -1]) for c in (cf(img) for _ in range(400))]
    assert 0.43 < sum(flipped) / 400 < 0.57


def test_one_channel_has_no_hue_saturation_or_grayscale():
    aug = DeviceAugment(AugmentSpec(in_chans=1))
    p = aug.sample(torch.zeros(500, dtype=torch.long), torch.Generator().manual_seed(0))
    assert not p.gray.any() and (p.factor[:, 2] == 1).all() and (p.factor[:, 3] == 0).all()
    x = torch.randint(0, 256, (500, 1, 12, 12), dtype=torch.uint8)
    y = aug.apply(x, p)
    assert y.shape == x.shape and y.dtype == torch.float32


def test_rejects_float_batches():
    from ibot.data.loader import Batch

    b = Batch(torch.zeros(4, 3, 8, 8), None, None, torch.zeros(2), 2, 0)
    with pytest.raises(TypeError, match="uint8"):
        DeviceAugment(AugmentSpec())(b, torch.Generator())


# ---------------------------------------------------------------------------- same distribution


@pytest.fixture(scope="module")
def crops():
    return same_crops(60)  # 1440 crops of 24 px


@pytest.mark.parametrize("kind", list(KINDS))
def test_full_recipe_channel_mean_and_std_match_pil(crops, kind):
    pil, dev = run_pil(crops, kind), run_device(crops, kind)
    pm, dm = pil.mean(dim=(0, 2, 3)), dev.mean(dim=(0, 2, 3))
    ps, ds = pil.std(dim=(0, 2, 3)), dev.std(dim=(0, 2, 3))
    torch.testing.assert_close(dm, pm, atol=0.04, rtol=0)
    torch.testing.assert_close(ds, ps, atol=0.04, rtol=0)
    # per-crop spread of the mean (what jitter strength moves) matches too
    torch.testing.assert_close(dev.mean(dim=(2, 3)).std(0), pil.mean(dim=(2, 3)).std(0), atol=0.04, rtol=0)
    # a wrong recipe (twice the brightness/contrast strength) is told apart
    wrong = run_device(crops, kind, brightness=0.8, contrast=0.8)
    assert (wrong.mean(dim=(2, 3)).std(0) - pil.mean(dim=(2, 3)).std(0)).abs().max() > 0.08


def test_grayscale_fraction_matches_pil(crops):
    pil, dev = run_pil(crops, "global1", blur=False), run_device(crops, "global1", blur=False)
    fp, fd = is_gray(pil).float().mean(), is_gray(dev).float().mean()
    assert abs(fp - 0.2) < 0.04 and abs(fd - fp) < 0.05, (fp, fd)


@pytest.mark.parametrize("kind", list(KINDS))
def test_solarized_fraction_matches_pil(kind):
    bright = (same_crops(30).float() * 0.4 + 150).round().byte()  # every pixel in [150, 252]
    kw = dict(jitter_p=0.0, gray_p=0.2, solarize_p=0.2)
    pil, dev = run_pil(bright, kind, **kw), run_device(bright, kind, **kw)
    fp = (unnormalise(pil).mean(dim=(1, 2, 3)) < 0.5).float().mean()
    fd = (unnormalise(dev).mean(dim=(1, 2, 3)) < 0.5).float().mean()
    expected = 0.2 if kind == "global2" else 0.0
    assert abs(fp - expected) < 0.05 and abs(fd - fp) < 0.05, (fp, fd)


@pytest.mark.parametrize("kind", list(KINDS))
def test_blur_fraction_and_strength_match_pil(kind):
    noisy = torch.randint(0, 256, (1200, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    kw = dict(jitter_p=0.0, gray_p=0.0, solarize_p=0.0)
    s0 = sharpness(noisy.float() / 255)
    rp = sharpness(unnormalise(run_pil(noisy, kind, **kw))) / s0
    rd = sharpness(unnormalise(run_device(noisy, kind, **kw))) / s0
    blurred_p, blurred_d = (rp < 0.9).float().mean(), (rd < 0.9).float().mean()
    assert abs(blurred_d - blurred_p) < 0.05, (blurred_p, blurred_d)
    assert abs(rd.mean() - rp.mean()) < 0.04, (rp.mean(), rd.mean())
    for q in (0.25, 0.5, 0.75):
        assert abs(rd.quantile(q) - rp.quantile(q)) < 0.06, (q, rp.quantile(q), rd.quantile(q))
    assert abs(blurred_p - BLUR_P[KINDS[kind]] * (2.0 - 0.3) / 1.9) < 0.1  # blurred ~ when sigma > ~0.3


def jitter_stats(x):
    """Per-crop luma mean, luma std, mean saturation, circular-mean hue of saturated pixels."""
    lum = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    h, s, v = hsv(x)
    w = (s > 0.25).float()
    ang = 2 * math.pi * h
    hue = torch.atan2((torch.sin(ang) * w).sum((1, 2)), (torch.cos(ang) * w).sum((1, 2)))
    return lum.mean((1, 2)), lum.std((1, 2)), s.mean((1, 2)), hue


def test_brightness_contrast_saturation_hue_shifts_match_pil(crops):
    kw = dict(jitter_p=1.0, gray_p=0.0, blur=False, solarize_p=0.0)
    base = jitter_stats(crops.float() / 255)
    pil = jitter_stats(unnormalise(run_pil(crops, "global1", **kw)))
    dev = jitter_stats(unnormalise(run_device(crops, "global1", **kw)))
    names = ["brightness", "contrast", "saturation"]
    for name, b, p, d in zip(names, base[:3], pil[:3], dev[:3], strict=True):
        rp, rd = p / b.clamp_min(1e-3), d / b.clamp_min(1e-3)
        assert abs(rd.mean() - rp.mean()) < 0.02, (name, rp.mean(), rd.mean())
        assert abs(rd.std() - rp.std()) < 0.02, (name, rp.std(), rd.std())
    dp = torch.remainder(pil[3] - base[3] + math.pi, 2 * math.pi) - math.pi  # hue shift in radians
    dd = torch.remainder(dev[3] - base[3] + math.pi, 2 * math.pi) - math.pi
    assert abs(dd.mean() - dp.mean()) < 0.03 and abs(dd.std() - dp.std()) < 0.03, (dp.std(), dd.std())
    # twice the hue strength is told apart
    wrong = jitter_stats(unnormalise(run_device(crops, "global1", hue=0.2, **kw)))
    dw = torch.remainder(wrong[3] - base[3] + math.pi, 2 * math.pi) - math.pi
    assert dw.std() - dp.std() > 0.15


# ---------------------------------------------------------------------------- decoding in the workers


def test_crop_flip_on_tensors_draws_the_pil_boxes_and_close_pixels():
    img = natural_images(1, size=120)[0]
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    cf = CropFlip(AugmentSpec(2, 32, (0.3, 1.0), 4, 16, (0.05, 0.3)))
    torch.manual_seed(7)
    from_pil = cf(img)
    torch.manual_seed(7)
    from_tensor = cf(x)
    for a, b in zip(from_pil, from_tensor, strict=True):
        assert a.shape == b.shape and b.dtype == torch.uint8
        # torch's antialiased uint8 bicubic against PIL's on the same box: within a grey level on average
        assert (a.float() - b.float()).abs().mean() < 1.5
    gray = CropFlip(AugmentSpec(1, 16, (0.5, 1.0), in_chans=1))(x)[0]
    assert gray.shape == (1, 16, 16)


def test_decoded_images_reads_files_with_torchvision_and_falls_back_to_pil(tmp_path):
    from ibot.data.datasets import FileImageDataset, slice_dataset
    from ibot.data.device_augment import DecodedImages

    img = natural_images(1, size=40)[0]
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "0.jpg", quality=95)
    img.save(tmp_path / "a" / "1.png")
    img.save(tmp_path / "a" / "2.bmp")
    (tmp_path / "a" / "3.jpg").write_bytes(b"not a jpeg")
    files = FileImageDataset(tmp_path)
    assert DecodedImages.supports(files) and not DecodedImages.supports(natural_images(1))
    dec = DecodedImages(files)
    jpg, png, bmp, bad = (dec[i] for i in range(4))
    ref = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    pil_jpg = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / "0.jpg")).copy()).permute(2, 0, 1)
    assert jpg[0].shape == (3, 40, 40) and (jpg[0].float() - pil_jpg.float()).abs().mean() < 1
    assert torch.equal(png[0], ref) and png[1] == 0
    assert isinstance(bmp[0], Image.Image)  # PIL fallback
    assert bad is None  # unreadable: skipped and counted like the PIL path
    sub = DecodedImages(slice_dataset(files, 1, 3), in_chans=1)
    assert len(sub) == 2 and sub[0][0].shape == (1, 40, 40)


def test_gpu_pipeline_trains_on_a_folder(tmp_path):
    from ibot.config import build_config
    from ibot.data.device_augment import DecodedImages
    from ibot.train.trainer import Trainer

    for i, img in enumerate(natural_images(32, size=48)):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "data" / f"c{i % 2}" / f"{i}.jpg")
    over = ["data.dataset=imagefolder", f"data.path={tmp_path / 'data'}", "data.pipeline=gpu", "optim.epochs=1"]
    over += [f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.knn_at_end=false"]
    tr = Trainer(build_config("smoke", over), log=lambda *a: None)
    assert isinstance(tr.data.mc_dataset.dataset, DecodedImages)
    tr.fit()
    assert tr.global_step == tr.data.niter >= 1  # (a few images are held out for evaluation)
    assert math.isfinite(tr.train_step(next(iter(tr.data.batches(0))), 0, 0).loss.item())


def test_a_batch_of_only_unreadable_images_passes_through_unchanged():
    """Issue 25 item 4: the collate's empty batch (every image unreadable) used to reach the uint8 check
    and raise TypeError on the gpu pipeline; it is passed on for the trainer to skip."""
    from ibot.data.loader import MultiCropCollate

    empty = MultiCropCollate(2, 3, 4, None)([None, None])
    assert empty.batch_size == 0 and empty.n_skipped == 2
    out = DeviceAugment(AugmentSpec(local_crops_number=3))(empty, torch.Generator().manual_seed(0))
    assert out.batch_size == 0 and out.n_skipped == 2
