"""Multi-crop augmentation.

* :class:`MultiCropTransform`: the official ``DataAugmentationiBOT`` recipe with torchvision on PIL
  images (global crop 1 always blurred; global crop 2 blur 0.1 + solarize 0.2; local crops blur 0.5;
  flip, colour jitter, grayscale, normalise). Counts, sizes and scales are configurable and
  grayscale datasets are supported (no hue/saturation jitter, one channel out).
* :class:`BatchMultiCrop`: the same family of augmentations applied to a whole uint8 batch at once
  with tensor ops (random resized crop + flip as one ``grid_sample``, brightness/contrast jitter,
  blur, solarize). For small in-memory datasets (MNIST, Fashion-MNIST, CIFAR) on CPU it costs a
  few milliseconds per batch where PIL costs hundreds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean and std: 0.5 for grayscale (1 channel), ImageNet's for RGB."""
    return ((0.5,), (0.5,)) if in_chans == 1 else (IMAGENET_MEAN, IMAGENET_STD)


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
    """PIL image -> list of G global then L local normalised crops (official recipe).

    Args:
        global_crops_number, global_size, global_scale: global crops.
        local_crops_number, local_size, local_scale: local crops.
        in_chans: 3 (RGB) or 1 (grayscale: no saturation/hue jitter, no random grayscale).
        mean, std: normalisation (default ImageNet for RGB, 0.5 for grayscale).
        blur_scale: multiplies the blur radius range (0.1, 2.0), useful for tiny images.
        jitter_p: probability of colour jitter per crop (official 0.8).
        solarize_p: probability of solarizing global crop 2 (official 0.2).
    """

    def __init__(
        self,
        global_crops_number: int = 2,
        global_size: int = 224,
        global_scale: Sequence[float] = (0.14, 1.0),
        local_crops_number: int = 0,
        local_size: int = 96,
        local_scale: Sequence[float] = (0.05, 0.4),
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        blur_scale: float = 1.0,
        jitter_p: float = 0.8,
        solarize_p: float = 0.2,
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        gray = in_chans == 1
        mean = mean or ((0.5,) if gray else IMAGENET_MEAN)
        std = std or ((0.5,) if gray else IMAGENET_STD)
        mode = "L" if gray else "RGB"
        jitter = T.ColorJitter(0.4, 0.4) if gray else T.ColorJitter(0.4, 0.4, 0.2, 0.1)
        flip_jitter = [T.RandomHorizontalFlip(p=0.5), T.RandomApply([jitter], p=jitter_p)]
        if not gray:
            flip_jitter.append(T.RandomGrayscale(p=0.2))
        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        bicubic = T.InterpolationMode.BICUBIC
        r = (0.1 * blur_scale, 2.0 * blur_scale)

        def crop(size, scale):
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        self.convert = lambda img: img if img.mode == mode else img.convert(mode)
        self.global1 = T.Compose([crop(global_size, global_scale), *flip_jitter, GaussianBlur(1.0, *r), *normalize])
        self.global2 = T.Compose(
            [crop(global_size, global_scale), *flip_jitter, GaussianBlur(0.1, *r), Solarization(solarize_p), *normalize]
        )
        self.local = T.Compose([crop(local_size, local_scale), *flip_jitter, GaussianBlur(0.5, *r), *normalize])
        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number

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
    one bilinear ``grid_sample``; brightness/contrast jitter with probability ``jitter_p``;
    Gaussian blur (global 1: always, global 2: 0.1, local: 0.5, as the official recipe) with sigma
    U(0.1, 2.0) * ``blur_scale``; solarization on global crop 2 with probability 0.2; normalisation.
    All randomness comes from the given ``torch.Generator``.
    """

    def __init__(
        self,
        global_crops_number: int = 2,
        global_size: int = 28,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_crops_number: int = 0,
        local_size: int = 12,
        local_scale: Sequence[float] = (0.05, 0.4),
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        jitter_p: float = 0.8,
        jitter: float = 0.4,
        blur_scale: float = 0.25,
        blur_p: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_p: float = 0.2,
    ) -> None:
        self.g, self.l = global_crops_number, local_crops_number
        self.gsize, self.lsize = global_size, local_size
        self.gscale, self.lscale = tuple(global_scale), tuple(local_scale)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.jitter_p, self.jitter = jitter_p, jitter
        self.blur_scale, self.blur_p, self.solarize_p = blur_scale, tuple(blur_p), solarize_p

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
        on = (torch.rand(b, 1, 1, 1, generator=gen) < self.jitter_p).float()
        bright = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * self.jitter * on
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * self.jitter * on
        x = (x * bright).clamp(0, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean).clamp(0, 1)

    def _blur(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        if p <= 0 or self.blur_scale <= 0:
            return x
        b, c, hh, ww = x.shape
        sigma = torch.empty(b).uniform_(0.1, 2.0, generator=gen) * self.blur_scale
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
        x = images.float() / 255.0
        crops = []
        for i in range(self.g):
            c = self._jitter(self._crop(x, self.gsize, self.gscale, gen), gen)
            c = self._blur(c, self.blur_p[0] if i == 0 else self.blur_p[1], gen)
            if i > 0:
                c = self._solarize(c, self.solarize_p, gen)
            crops.append(c)
        g = (torch.cat(crops) - self.mean) / self.std
        if not self.l:
            return g, None
        xl = x.repeat(self.l, 1, 1, 1)
        c = self._blur(self._jitter(self._crop(xl, self.lsize, self.lscale, gen), gen), self.blur_p[2], gen)
        return g, (c - self.mean) / self.std
