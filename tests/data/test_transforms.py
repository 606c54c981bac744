import random

import pytest
import torch
from PIL import Image

from ibot.builders.data import batch_augment_from_config, pil_transform_from_config
from ibot.config import build_config
from ibot.data.transforms import AugmentSpec, BatchMultiCrop, MultiCropTransform


def tensor_spec(g, gsize, gscale, n_local=0, lsize=12, lscale=(0.05, 0.4), **kw):
    """An AugmentSpec with the values these tests were written for: grayscale normalisation (0.5) and
    blur_scale 0.25 (the tensor path's own defaults before it took the shared spec)."""
    return AugmentSpec(g, gsize, gscale, n_local, lsize, lscale, **{"in_chans": 1, "blur_scale": 0.25, **kw})


def _images(b=6, value=None, seed=0):
    if value is not None:
        return torch.full((b, 1, 28, 28), value, dtype=torch.uint8)
    return torch.randint(0, 256, (b, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_batch_multicrop_shapes_and_determinism():
    aug = BatchMultiCrop(tensor_spec(2, 28, (0.35, 1.0), 3, 14, (0.1, 0.35)))
    x = _images()
    g1, l1 = aug(x, torch.Generator().manual_seed(3))
    g2, l2 = aug(x, torch.Generator().manual_seed(3))
    g3, _ = aug(x, torch.Generator().manual_seed(4))
    assert g1.shape == (2 * 6, 1, 28, 28) and l1.shape == (3 * 6, 1, 14, 14)
    assert g1.dtype == torch.float32
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    assert not torch.equal(g1, g3)
    g, loc = BatchMultiCrop(tensor_spec(2, 28, (0.35, 1.0), 0))(x, torch.Generator().manual_seed(0))
    assert loc is None and g.shape == (12, 1, 28, 28)


def test_batch_multicrop_jitter_and_solarize_probabilities():
    x = _images(value=200)  # a constant image stays constant under crop, flip and blur
    plain = (200 / 255 - 0.5) / 0.5
    off = BatchMultiCrop(tensor_spec(2, 28, (0.35, 1.0), 2, 14, (0.1, 0.35), color_jitter_p=0.0, solarization_p=0.0))
    g, loc = off(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g, torch.full_like(g, plain))
    torch.testing.assert_close(loc, torch.full_like(loc, plain))
    sol = BatchMultiCrop(tensor_spec(2, 28, (0.35, 1.0), 0, color_jitter_p=0.0, solarization_p=1.0))
    g, _ = sol(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g[:6], torch.full_like(g[:6], plain))  # only global crop 2 is solarized
    torch.testing.assert_close(g[6:], torch.full_like(g[6:], ((1 - 200 / 255) - 0.5) / 0.5))
    jit = BatchMultiCrop(tensor_spec(2, 28, (0.35, 1.0), 0, color_jitter_p=1.0, solarization_p=0.0))
    g, _ = jit(x, torch.Generator().manual_seed(0))
    assert (g - plain).abs().amax() > 0.05  # jitter changed the constant images


def test_pil_multicrop_jitter_and_solarize_probabilities():
    img = Image.fromarray(_images(1, value=200)[0, 0].numpy(), mode="L")
    plain = (200 / 255 - 0.5) / 0.5
    random.seed(0)
    torch.manual_seed(0)
    spec = AugmentSpec(2, 28, (0.35, 1.0), 2, 14, (0.1, 0.35), in_chans=1, color_jitter_p=0.0, solarization_p=1.0)
    crops = MultiCropTransform(spec)(img)
    assert [tuple(c.shape) for c in crops] == [(1, 28, 28)] * 2 + [(1, 14, 14)] * 2
    for c in (crops[0], *crops[2:]):
        torch.testing.assert_close(c, torch.full_like(c, plain), atol=1 / 255, rtol=0)
    solar = ((255 - 200) / 255 - 0.5) / 0.5
    torch.testing.assert_close(crops[1], torch.full_like(crops[1], solar), atol=1 / 255, rtol=0)


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_config_controls_jitter_and_solarization(pipeline):
    cfg = build_config("fmnist_tiny", ["data.color_jitter_p=0.3", "data.solarization_p=0.0"])
    if pipeline == "tensor":
        aug = batch_augment_from_config(cfg)
        assert (aug.spec.color_jitter_p, aug.spec.solarization_p) == (0.3, 0.0)
    else:
        aug = pil_transform_from_config(cfg)
        probs = [t.p for t in aug.global2.transforms if hasattr(t, "p")]
        assert 0.3 in probs and 0.0 in probs


def _crop_boxes(out, size, image):
    """Per output crop: (width fraction, height fraction, centre x, centre y, x flipped) in [-1, 1] units.

    ``out`` holds crops of a (x ramp, y ramp) image whose pixel values are 4 * column and 4 * row:
    bilinear sampling of a linear ramp is exact, so each crop reads back where it was taken from.
    """
    pos = out * 255 / 4  # (B, 2, S, S): sampled input coordinates in pixels
    inner = slice(2, size - 2)  # away from the border, where reflection padding bends the ramp
    j = torch.arange(size, dtype=torch.float64)[inner]
    xs = pos[:, 0, size // 2, inner].double()  # along a row: x coordinates
    ys = pos[:, 1, inner, size // 2].double()  # along a column: y coordinates
    boxes = []
    for x, y in zip(xs, ys, strict=True):
        sx, x0 = torch.linalg.lstsq(torch.stack([j, torch.ones_like(j)], 1), x.unsqueeze(1)).solution[:, 0]
        sy, y0 = torch.linalg.lstsq(torch.stack([j, torch.ones_like(j)], 1), y.unsqueeze(1)).solution[:, 0]
        mid = (size - 1) / 2
        cx = ((x0 + sx * mid) + 0.5) * 2 / image - 1
        cy = ((y0 + sy * mid) + 0.5) * 2 / image - 1
        boxes.append((abs(sx) * size / image, abs(sy) * size / image, cx, cy, sx < 0, sy < 0))
    return torch.tensor(boxes, dtype=torch.float64)


def test_batch_multicrop_crop_geometry():
    n, image, size = 400, 64, 16
    yy, xx = torch.meshgrid(torch.arange(image), torch.arange(image), indexing="ij")
    ramps = torch.stack([4 * xx, 4 * yy]).to(torch.uint8).expand(n, -1, -1, -1)
    spec = tensor_spec(1, size, (0.2, 0.6), 0, mean=(0.0, 0.0), std=(1.0, 1.0), color_jitter_p=0.0, blur_p=(0, 0, 0))
    aug = BatchMultiCrop(spec)
    out, _ = aug(ramps, torch.Generator().manual_seed(0))
    w, h, cx, cy, flip_x, flip_y = _crop_boxes(out, size, image).unbind(1)
    area, ratio = w * h, w / h
    tol = 1e-3
    assert area.min() >= 0.2 - tol and area.max() <= 0.6 + tol  # scale range (fraction of the image)
    assert area.min() < 0.22 and area.max() > 0.58  # ... and all of it is used
    assert ratio.min() >= 3 / 4 - tol and ratio.max() <= 4 / 3 + tol  # aspect ratio (3/4, 4/3)
    assert ratio.min() < 0.78 and ratio.max() > 1.28
    assert (cx.abs() + w <= 1 + tol).all() and (cy.abs() + h <= 1 + tol).all()  # inside the image
    assert 0.4 < flip_x.mean() < 0.6 and not flip_y.any()  # horizontal flips only, half of the time


def test_batch_multicrop_blur_is_a_separable_gaussian():
    n = 400
    impulse = torch.zeros(n, 1, 21, 21)
    impulse[:, :, 10, 10] = 1.0
    aug = BatchMultiCrop(tensor_spec(2, 28, (0.4, 1.0), blur_scale=1.0))
    out = aug._blur(impulse, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.sum((-1, -2)), torch.ones(n, 1))  # normalised kernel
    torch.testing.assert_close(out, out.flip(-1))
    torch.testing.assert_close(out, out.transpose(-1, -2))
    profile = out.sum(-2)[:, 0]  # (n, 21): the 1-D kernel
    torch.testing.assert_close(out[:, 0], profile.unsqueeze(2) * profile.unsqueeze(1))  # separable
    t = torch.arange(-10, 11, dtype=torch.float32)
    sigma = (profile * t**2).sum(-1).sqrt()
    assert sigma.max() <= 2.0 and sigma.max() > 1.8  # sigma ~ U(0.1, 2.0) * blur_scale (3-sigma tails cut)
    assert sigma.min() < 0.3
    half = BatchMultiCrop(tensor_spec(2, 28, (0.4, 1.0), blur_scale=0.5))._blur(
        impulse, 1.0, torch.Generator().manual_seed(0)
    )
    assert (half.sum(-2)[:, 0] * t**2).sum(-1).sqrt().max() <= 1.0
    # probability: each image is blurred (its neighbours of the impulse light up) with probability p
    some = aug._blur(impulse, 0.5, torch.Generator().manual_seed(1))
    blurred = (some[:, 0, 10, 11] > 0).float().mean()
    assert 0.42 < blurred < 0.58
    torch.testing.assert_close(aug._blur(impulse, 0.0, torch.Generator()), impulse, rtol=0, atol=0)


def test_batch_multicrop_blur_probability_per_crop(monkeypatch):
    aug = BatchMultiCrop(tensor_spec(2, 28, (0.35, 1.0), 3, 14, (0.1, 0.35)))
    calls = []
    real = aug._blur
    monkeypatch.setattr(aug, "_blur", lambda x, p, gen: calls.append((x.shape[0], x.shape[-1], p)) or real(x, p, gen))
    aug(_images(), torch.Generator().manual_seed(0))
    # official recipe: global crop 1 always, global crop 2 with 0.1, every local crop with 0.5
    assert calls == [(6, 28, 1.0), (6, 28, 0.1), (18, 14, 0.5)]
