"""Multi-crop augmentation.

* :class:`AugmentSpec`: the one description of the multi-crop recipe (geometry, colour jitter,
  grayscale, blur, solarization, normalisation) that every pipeline takes, with the official
  defaults. ``ibot.builders.data.augment_spec_from_config`` makes it from a config.
* :class:`MultiCropTransform`: the official ``DataAugmentationiBOT`` recipe with torchvision on PIL
  images (global crop 1 always blurred; global crop 2 blur 0.1 + solarize 0.2; local crops blur 0.5;
  flip, colour jitter, grayscale, normalise). Counts, sizes and scales are configurable and
  grayscale datasets are supported (no hue/saturation jitter, one channel out).
* :class:`BatchMultiCrop`: the same family of augmentations applied to a whole uint8 batch at once
  with tensor ops (random resized crop + flip as one ``grid_sample``, brightness/contrast jitter,
  blur, solarize). For small in-memory datasets (MNIST, Fashion-MNIST, CIFAR) on CPU it costs a
  few milliseconds per batch where PIL costs hundreds.

The device pipeline (``data.pipeline=gpu``, :mod:`ibot.data.device_augment`) takes the same spec.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean and std: 0.5 for grayscale (1 channel), ImageNet's for RGB."""
    return ((0.5,), (0.5,)) if in_chans == 1 else (IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class AugmentSpec:
    """The multi-crop augmentation recipe, one name per knob, with the official defaults
    (``DataAugmentationiBOT`` of bytedance/ibot). Every pipeline takes it:
    :class:`MultiCropTransform` (``data.pipeline=pil``), :class:`BatchMultiCrop` (``tensor``) and
    :class:`~ibot.data.device_augment.CropFlip` + :class:`~ibot.data.device_augment.DeviceAugment`
    (``gpu``: the workers read the geometry, the device reads the rest).

    Geometry (random resized crop, aspect (3/4, 4/3), then a horizontal flip with p=0.5):
        global_crops_number, global_crop_size, global_crops_scale: G global crops (the first is
            "global crop 1", the others "global crops 2..G"), their size in pixels and area range.
        local_crops_number, local_crop_size, local_crops_scale: L local crops (official argparse
            default 0; the ImageNet recipes use 10).
    Channels and normalisation:
        in_chans: 3 (RGB) or 1 (grayscale: no saturation/hue jitter, no random grayscale).
        mean, std: normalisation; None: :func:`norm_stats` of ``in_chans`` (ImageNet for RGB, 0.5 for
            grayscale), see :meth:`normalization`.
    Colour:
        color_jitter_p: probability of colour jitter per crop (0.8).
        brightness, contrast, saturation, hue: jitter strengths (0.4, 0.4, 0.2, 0.1).
        grayscale_p: probability of grayscale per crop (0.2; never for one channel).
    Blur and solarization:
        blur_p: blur probability of (global crop 1, global crops 2..G, local crops): (1.0, 0.1, 0.5).
        blur_sigma: the blur sigma (PIL radius) range (0.1, 2.0), multiplied by ``blur_scale``.
        blur_scale: 1.0 (smaller for tiny images).
        solarization_p: probability of solarizing each of global crops 2..G (0.2).

    What each pipeline does not implement (the knob is ignored there, not emulated):

    * :class:`BatchMultiCrop` (tensor path) jitters brightness and contrast only, in that fixed order
      (``saturation``, ``hue`` and ``grayscale_p`` are ignored); it crops with bilinear
      ``grid_sample`` (the others: bicubic), blurs with a sampled Gaussian cut at 3 sigma (the others:
      PIL's three box blurs), solarizes at 0.5 on floats, and takes its channels from the images
      (``in_chans`` only picks the default mean/std).
    * :class:`~ibot.data.device_augment.CropFlip` reads only the geometry and ``in_chans``.
    * :class:`~ibot.data.device_augment.DeviceAugment` reads everything but the geometry (the crops
      arrive cut) except the crop counts, which tell the global crops 2..G from global crop 1.
    """

    global_crops_number: int = 2
    global_crop_size: int = 224
    global_crops_scale: tuple[float, float] = (0.14, 1.0)
    local_crops_number: int = 0
    local_crop_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    in_chans: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_scale: float = 1.0
    solarization_p: float = 0.2

    def __post_init__(self) -> None:
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        # sequences as tuples of floats: hashable, and equal whether they came from a list or a tuple
        lengths = {"global_crops_scale": 2, "local_crops_scale": 2, "blur_p": 3, "blur_sigma": 2}
        for name in (*lengths, "mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(float(v) for v in value)
            if name in lengths and len(value) != lengths[name]:
                raise ValueError(f"{name} needs {lengths[name]} values, got {value}")
            object.__setattr__(self, name, value)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std): the given ones, else :func:`norm_stats` of ``in_chans``."""
        mean, std = norm_stats(self.in_chans)
        return self.mean or mean, self.std or std

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The blur sigma range, ``blur_sigma`` x ``blur_scale``."""
        return self.blur_sigma[0] * self.blur_scale, self.blur_sigma[1] * self.blur_scale


class GaussianBlur:
    """PIL Gaussian blur with radius U(0.1, 2.0), applied when ``random.random() <= p`` (official)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """PIL solarization (threshold 128), applied when ``random.random() < p`` (official)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class MultiCropTransform:
    """PIL image -> list of G global then L local normalised crops (official recipe, torchvision).

    Reads every knob of the :class:`AugmentSpec` (default: ``AugmentSpec()``, the official recipe).
    """

    def __init__(self, spec: AugmentSpec | None = None) -> None:
        self.spec = spec = spec or AugmentSpec()
        gray = spec.in_chans == 1
        mean, std = spec.normalization()
        mode = "L" if gray else "RGB"
        if gray:
            jitter = T.ColorJitter(spec.brightness, spec.contrast)
        else:
            jitter = T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        flip_jitter = [T.RandomHorizontalFlip(p=0.5), T.RandomApply([jitter], p=spec.color_jitter_p)]
        if not gray:
            flip_jitter.append(T.RandomGrayscale(p=spec.grayscale_p))
        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        bicubic = T.InterpolationMode.BICUBIC
        r = spec.sigma_range
        p1, p2, p_local = spec.blur_p

        def crop(size, scale):
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        gsize, gscale = spec.global_crop_size, spec.global_crops_scale
        lsize, lscale = spec.local_crop_size, spec.local_crops_scale
        solarize = Solarization(spec.solarization_p)
        self.convert = lambda img: img if img.mode == mode else img.convert(mode)
        self.global1 = T.Compose([crop(gsize, gscale), *flip_jitter, GaussianBlur(p1, *r), *normalize])
        self.global2 = T.Compose([crop(gsize, gscale), *flip_jitter, GaussianBlur(p2, *r), solarize, *normalize])
        self.local = T.Compose([crop(lsize, lscale), *flip_jitter, GaussianBlur(p_local, *r), *normalize])
        self.global_crops_number = spec.global_crops_number
        self.local_crops_number = spec.local_crops_number

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = self.convert(img)
        crops = [self.global1(img)]
        crops += [self.global2(img) for _ in range(self.global_crops_number - 1)]
        crops += [self.local(img) for _ in range(self.local_crops_number)]
        return crops


def eval_transform(size: int, in_chans: int = 3, mean=None, std=None, resize: int | None = None):
    """Evaluation transform: resize (default size * 256/224 for >= 64 px, else none), center crop."""
    gray = in_chans == 1
    mean = mean or ((0.5,) if gray else IMAGENET_MEAN)
    std = std or ((0.5,) if gray else IMAGENET_STD)
    mode = "L" if gray else "RGB"
    if resize is None:
        resize = int(round(size * 256 / 224)) if size >= 64 else size
    return T.Compose(
        [
            T.Lambda(lambda img: img if img.mode == mode else img.convert(mode)),
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class BatchMultiCrop:
    """Vectorised multi-crop augmentation of a uint8 batch (B, C, H, W) -> G + L float crop batches.

    Per image and crop: random resized crop (scale range, aspect (3/4, 4/3)) and horizontal flip as
    one bilinear ``grid_sample``; brightness/contrast jitter with probability ``color_jitter_p``;
    Gaussian blur with probabilities ``blur_p`` (global 1, global 2..G, local) and sigma
    U(``blur_sigma``) x ``blur_scale``; solarization of global crops 2..G with probability
    ``solarization_p``; normalisation. The knobs come from the :class:`AugmentSpec` (default:
    ``AugmentSpec()``), whose docstring lists those this path ignores (saturation, hue, grayscale).
    All randomness comes from the given ``torch.Generator``.
    """

    def __init__(self, spec: AugmentSpec | None = None) -> None:
        self.spec = spec = spec or AugmentSpec()
        mean, std = spec.normalization()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def _crop(self, x: torch.Tensor, size: int, scale, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
        log_r = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        ratio = torch.exp(log_r)
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of the width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=gen) * (1 - w) + w / 2) * 2 - 1
        cy = (torch.rand(b, generator=gen) * (1 - h) + h / 2) * 2 - 1
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        spec = self.spec
        on = (torch.rand(b, 1, 1, 1, generator=gen) < spec.color_jitter_p).float()
        bright = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * spec.brightness * on
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * spec.contrast * on
        x = (x * bright).clamp(0, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean).clamp(0, 1)

    def _blur(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        lo, hi, scale = *self.spec.blur_sigma, self.spec.blur_scale
        if p <= 0 or scale <= 0:
            return x
        b, c, hh, ww = x.shape
        sigma = torch.empty(b).uniform_(lo, hi, generator=gen) * scale
        on = torch.rand(b, generator=gen) < p
        if not bool(on.any()):
            return x
        radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(hh, ww) - 1) // 2))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
        k = (k / k.sum(1, keepdim=True))[on]  # (b_on, 2r+1): one kernel per blurred image
        y = x[on]
        # separable per-image blur as unfold + weighted sum (grouped conv is slow for many tiny groups)
        y = F.pad(y, (radius, radius, 0, 0), mode="reflect").unfold(3, 2 * radius + 1, 1)
        y = (y * k.view(-1, 1, 1, 1, 2 * radius + 1)).sum(-1)
        y = F.pad(y, (0, 0, radius, radius), mode="reflect").unfold(2, 2 * radius + 1, 1)
        y = (y * k.view(-1, 1, 1, 1, 2 * radius + 1)).sum(-1)
        out = x.clone()
        out[on] = y
        return out

    def _solarize(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        on = (torch.rand(x.shape[0], 1, 1, 1, generator=gen) < p) & (x >= 0.5)
        return torch.where(on, 1 - x, x)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) uint8 -> global crops (G*B, C, S, S) and local crops (L*B, C, s, s) or None."""
        spec = self.spec
        x = images.float() / 255.0
        crops = []
        for i in range(spec.global_crops_number):
            c = self._jitter(self._crop(x, spec.global_crop_size, spec.global_crops_scale, gen), gen)
            c = self._blur(c, spec.blur_p[0] if i == 0 else spec.blur_p[1], gen)
            if i > 0:
                c = self._solarize(c, spec.solarization_p, gen)
            crops.append(c)
        g = (torch.cat(crops) - self.mean) / self.std
        if not spec.local_crops_number:
            return g, None
        xl = x.repeat(spec.local_crops_number, 1, 1, 1)
        c = self._jitter(self._crop(xl, spec.local_crop_size, spec.local_crops_scale, gen), gen)
        c = self._blur(c, spec.blur_p[2], gen)
        return g, (c - self.mean) / self.std
