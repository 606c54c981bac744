import random

import pytest
import torch
from PIL import Image

from ibot.config import build_config
from ibot.data.factory import batch_augment_from_config, pil_transform_from_config
from ibot.data.transforms import BatchMultiCrop, MultiCropTransform


def _images(b=6, value=None, seed=0):
    if value is not None:
        return torch.full((b, 1, 28, 28), value, dtype=torch.uint8)
    return torch.randint(0, 256, (b, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_batch_multicrop_shapes_and_determinism():
    aug = BatchMultiCrop(2, 28, (0.35, 1.0), 3, 14, (0.1, 0.35))
    x = _images()
    g1, l1 = aug(x, torch.Generator().manual_seed(3))
    g2, l2 = aug(x, torch.Generator().manual_seed(3))
    g3, _ = aug(x, torch.Generator().manual_seed(4))
    assert g1.shape == (2 * 6, 1, 28, 28) and l1.shape == (3 * 6, 1, 14, 14)
    assert g1.dtype == torch.float32
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    assert not torch.equal(g1, g3)
    g, loc = BatchMultiCrop(2, 28, (0.35, 1.0), 0)(x, torch.Generator().manual_seed(0))
    assert loc is None and g.shape == (12, 1, 28, 28)


def test_batch_multicrop_jitter_and_solarize_probabilities():
    x = _images(value=200)  # a constant image stays constant under crop, flip and blur
    plain = (200 / 255 - 0.5) / 0.5
    off = BatchMultiCrop(2, 28, (0.35, 1.0), 2, 14, (0.1, 0.35), jitter_p=0.0, solarize_p=0.0)
    g, loc = off(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g, torch.full_like(g, plain))
    torch.testing.assert_close(loc, torch.full_like(loc, plain))
    sol = BatchMultiCrop(2, 28, (0.35, 1.0), 0, jitter_p=0.0, solarize_p=1.0)
    g, _ = sol(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g[:6], torch.full_like(g[:6], plain))  # only global crop 2 is solarized
    torch.testing.assert_close(g[6:], torch.full_like(g[6:], ((1 - 200 / 255) - 0.5) / 0.5))
    jit = BatchMultiCrop(2, 28, (0.35, 1.0), 0, jitter_p=1.0, solarize_p=0.0)
    g, _ = jit(x, torch.Generator().manual_seed(0))
    assert (g - plain).abs().amax() > 0.05  # jitter changed the constant images


def test_pil_multicrop_jitter_and_solarize_probabilities():
    img = Image.fromarray(_images(1, value=200)[0, 0].numpy(), mode="L")
    plain = (200 / 255 - 0.5) / 0.5
    random.seed(0)
    torch.manual_seed(0)
    crops = MultiCropTransform(2, 28, (0.35, 1.0), 2, 14, (0.1, 0.35), in_chans=1, jitter_p=0.0, solarize_p=1.0)(img)
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
        assert (aug.jitter_p, aug.solarize_p) == (0.3, 0.0)
    else:
        aug = pil_transform_from_config(cfg)
        probs = [t.p for t in aug.global2.transforms if hasattr(t, "p")]
        assert 0.3 in probs and 0.0 in probs
