"""One AugmentSpec from one config drives the pil, tensor and gpu pipelines alike."""

import random

import pytest
import torch
from PIL import Image

from ibot.builders.data import (
    augment_spec_from_config,
    batch_augment_from_config,
    crop_flip_from_config,
    device_augment_from_config,
    pil_transform_from_config,
)
from ibot.config import build_config
from ibot.data.loader import Batch
from ibot.data.transforms import AugmentSpec, GaussianBlur, Solarization


def test_spec_defaults_are_the_official_recipe():
    s = AugmentSpec()
    assert (s.global_crops_number, s.global_crop_size, s.global_crops_scale) == (2, 224, (0.14, 1.0))
    assert (s.local_crop_size, s.local_crops_scale) == (96, (0.05, 0.4))
    assert (s.color_jitter_p, s.brightness, s.contrast, s.saturation, s.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert (s.grayscale_p, s.blur_p, s.sigma_range, s.solarization_p) == (0.2, (1.0, 0.1, 0.5), (0.1, 2.0), 0.2)
    assert s.normalization() == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert AugmentSpec(in_chans=1).normalization() == ((0.5,), (0.5,))
    assert AugmentSpec(global_crops_scale=[0.3, 1]) == AugmentSpec(global_crops_scale=(0.3, 1.0))
    with pytest.raises(ValueError, match="in_chans"):
        AugmentSpec(in_chans=2)
    with pytest.raises(ValueError, match="blur_p"):
        AugmentSpec(blur_p=(1.0, 0.5))


def test_one_config_change_reaches_every_pipeline():
    changes = ["data.color_jitter_p=0.5", "data.solarization_p=0", "data.blur_scale=0.5", "data.local_crops_number=2"]
    cfg = build_config("smoke", changes)
    spec = augment_spec_from_config(cfg)
    assert (spec.color_jitter_p, spec.solarization_p, spec.blur_scale, spec.local_crops_number) == (0.5, 0.0, 0.5, 2)
    assert spec.global_crop_size == cfg.model.img_size and spec.in_chans == cfg.model.in_chans
    pil, tensor = pil_transform_from_config(cfg), batch_augment_from_config(cfg)
    crop, device = crop_flip_from_config(cfg), device_augment_from_config(cfg)
    assert pil.spec == tensor.spec == crop.spec == device.spec == spec
    # ... and each pipeline's operations read it
    jitter_p = [t.p for t in pil.global1.transforms if type(t).__name__ == "RandomApply"]
    assert jitter_p == [0.5]
    assert [t.p for t in pil.global2.transforms if isinstance(t, Solarization)] == [0.0]
    assert [t.radius_max for t in pil.local.transforms if isinstance(t, GaussianBlur)] == [1.0]
    assert device.sigma == (0.05, 1.0)
    assert len(crop.crops) == cfg.data.global_crops_number + 2


def _constant_outputs(cfg, value=200):
    """Per pipeline: the G global and L local crops of one constant uint8 image, as float tensors."""
    c, size = cfg.model.in_chans, cfg.model.img_size
    u8 = torch.full((1, c, size, size), value, dtype=torch.uint8)
    img = Image.new("L" if c == 1 else "RGB", (size, size), (value,) * c if c == 3 else value)
    ng, nl = cfg.data.global_crops_number, cfg.data.local_crops_number
    random.seed(0)
    torch.manual_seed(0)
    out = {"pil": pil_transform_from_config(cfg)(img)}
    g, loc = batch_augment_from_config(cfg)(u8, torch.Generator().manual_seed(0))
    out["tensor"] = [*g.split(1), *loc.split(1)]
    crops = crop_flip_from_config(cfg)(img)
    batch = Batch(torch.stack(crops[:ng]), torch.stack(crops[ng:]), None, torch.zeros(1), ng, nl)
    aug = device_augment_from_config(cfg)(batch, torch.Generator().manual_seed(0))
    out["gpu"] = [*aug.global_crops.split(1), *aug.local_crops.split(1)]
    return {k: [t.reshape(c, -1) for t in v] for k, v in out.items()}


def test_config_switches_act_the_same_in_every_pipeline():
    """No jitter, no blur, solarize always: on a constant image every pipeline gives global crop 1 and
    the local crops unchanged and global crops 2..G solarized."""
    changes = ["data.color_jitter_p=0", "data.blur_scale=0", "data.solarization_p=1", "data.local_crops_number=2"]
    cfg = build_config("fmnist_tiny", changes)  # one channel: no random grayscale either
    plain, solar = (200 / 255 - 0.5) / 0.5, (55 / 255 - 0.5) / 0.5
    ng = cfg.data.global_crops_number
    for name, crops in _constant_outputs(cfg).items():
        assert len(crops) == ng + 2, name
        for i, crop in enumerate(crops):
            expect = solar if 0 < i < ng else plain
            torch.testing.assert_close(crop, torch.full_like(crop, expect), atol=1 / 255, rtol=0, msg=name)
    # the same switches left at their defaults do change the crops: the test would see a lost knob
    default = _constant_outputs(build_config("fmnist_tiny", ["data.local_crops_number=2"]))
    for name, crops in default.items():
        assert not torch.allclose(crops[1], torch.full_like(crops[1], solar), atol=1 / 255), name
