"""The device pipeline (``data.pipeline=gpu``): the official multi-crop recipe split in two halves.

* :class:`CropFlip` runs in the DataLoader workers: random resized crop (bicubic, the official scale
  and aspect ranges) and horizontal flip of the decoded image (:class:`DecodedImages` decodes files
  with torchvision), returned as **uint8** (C, S, S) tensors. This is the part of
  ``DataAugmentationiBOT`` that needs the full-size image.
* :class:`DeviceAugment` runs in the main process on the training device (CUDA, or the CPU), on a
  whole uint8 :class:`~ibot.data.loader.Batch` at once with per-sample random parameters: colour
  jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, each crop's four adjustments in
  its own random order as torchvision's ``ColorJitter``; applied with p=0.8), grayscale (p=0.2),
  Gaussian blur (global crop 1: p=1, global crops 2..G: p=0.1, local crops: p=0.5; sigma
  U(0.1, 2.0) x ``blur_scale``, as PIL's three box blurs), solarization (global crops 2..G, p=0.2,
  threshold 128) and normalisation.

Both halves take the :class:`~ibot.data.transforms.AugmentSpec` of the other pipelines (the values
above are its official defaults).

The outputs follow the same distribution as the PIL recipe
(:class:`ibot.data.transforms.MultiCropTransform`), not the same pixels: the device half computes in
float without rounding to uint8 between steps (``tests/data/test_device_augment.py`` compares the
two over many samples). All random parameters of the device half are drawn on the CPU from one
``torch.Generator``, so CPU and CUDA runs draw the same parameters and no step needs a device
synchronisation to pick the rows an operation applies to.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from ibot.data.transforms import AugmentSpec

# Rec. 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
LUMA = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


class CropFlip:
    """Worker half: image -> G global then L local uint8 crops (C, S, S).

    Random resized crop (scale range, aspect (3/4, 4/3), bicubic with antialiasing, as
    ``T.RandomResizedCrop``) then a horizontal flip with p=0.5. Takes a PIL image (resized by PIL) or
    a uint8 (C, H, W) tensor (from :class:`DecodedImages`, resized by torch's uint8 antialiased
    bicubic, about twice as fast as stock Pillow and as fast as Pillow-SIMD). The randomness comes
    from torch's global generator, which :class:`~ibot.data.loader.MultiCropDataset` seeds per
    ``(seed, epoch, index)``; both inputs draw the same crop boxes and flips.

    Reads the geometry and ``in_chans`` of the :class:`~ibot.data.transforms.AugmentSpec` (default:
    ``AugmentSpec()``); :class:`DeviceAugment` reads the rest.
    """

    def __init__(self, spec: AugmentSpec | None = None) -> None:
        self.spec = spec = spec or AugmentSpec()
        self.in_chans, self.mode = spec.in_chans, "L" if spec.in_chans == 1 else "RGB"
        self.crops = [(spec.global_crop_size, spec.global_crops_scale)] * spec.global_crops_number
        self.crops += [(spec.local_crop_size, spec.local_crops_scale)] * spec.local_crops_number
        self.ratio = (3 / 4, 4 / 3)

    def crop(self, img: Image.Image | torch.Tensor, size: int, scale) -> torch.Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), list(self.ratio))
        if isinstance(img, torch.Tensor):
            region = img[None, :, top : top + h, left : left + w]
            t = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)[0]
        else:  # resize with a box == crop then resize, without copying the cropped region first
            out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            t = torch.from_numpy(np.asarray(out).copy())
            t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return t.flip(-1) if torch.rand(1) < 0.5 else t

    def __call__(self, img: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(img, torch.Tensor):
            img = _channels(img, self.in_chans)
        elif img.mode != self.mode:
            img = img.convert(self.mode)
        return [self.crop(img, size, scale) for size, scale in self.crops]


def _channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.shape[0] == in_chans:
        return x
    if in_chans == 3:
        return x[:1].expand(3, -1, -1)
    return luma(x[None, :3].float()).round().clamp(0, 255).to(torch.uint8)[0]


class DecodedImages(torch.utils.data.Dataset):
    """Items of an image-file dataset as ``(uint8 (C, H, W) tensor, label)``, decoded by torchvision.

    JPEG, PNG, WebP and GIF (files, or the bytes of a shard's sample) go through
    ``torchvision.io.decode_image`` (libjpeg-turbo for JPEG); other formats, and files torchvision
    cannot read, through the dataset's own PIL loader. An unreadable file gives None (skipped and
    counted by the collate), as the PIL path.

    Args:
        dataset: a :class:`~ibot.data.datasets.FileImageDataset` or :class:`~ibot.data.shards.ShardDataset`
            (its ``read_bytes``), or a ``Subset`` of one.
        in_chans: 3 (RGB) or 1 (grayscale).
    """

    TORCHVISION = (".jpg", ".jpeg", ".png", ".webp", ".gif")

    def __init__(self, dataset, in_chans: int = 3) -> None:
        base, self.indices = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, self.indices = dataset.dataset, list(dataset.indices)
        self.base, self.in_chans = base, in_chans
        self.labels = getattr(dataset, "labels", None)
        self.classes = getattr(dataset, "classes", [])

    @staticmethod
    def supports(dataset) -> bool:
        base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        return hasattr(base, "read_bytes") or (hasattr(base, "samples") and hasattr(base, "root"))

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, i: int):
        j = self.indices[i] if self.indices is not None else i
        if hasattr(self.base, "read_bytes"):  # shards: the encoded bytes of the sample
            try:
                data, name, label = self.base.read_bytes(j)
            except OSError:
                return self.base[j]  # reports and skips it
            source = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            name, label = self.base.samples[j]
            source = name
        if name.lower().endswith(self.TORCHVISION):
            try:  # torchvision 0.29 deprecates its decoders: without them, PIL decodes
                from torchvision.io import ImageReadMode, decode_image

                mode = ImageReadMode.RGB if self.in_chans == 3 else ImageReadMode.GRAY
                with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for TorchCodec)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    x = decode_image(source, mode=mode)
                if x.dtype == torch.uint8:  # 16-bit PNGs: PIL's loader rescales them to 8 bits
                    return x, label
            except Exception:  # noqa: BLE001 - let PIL try (and report) what torchvision cannot read
                pass
        item = self.base[j]  # PIL; None (already reported) when unreadable
        return item


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (host) on ``device`` without a host wait: on CUDA through pinned memory, ``non_blocking``
    (a copy from pageable memory waits for the stream)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class AugmentParams:
    """Per-row random parameters of one call (CPU tensors, n rows = crops of the batch).

    order: (n, 4) long, the jitter operations (BRIGHTNESS, CONTRAST, SATURATION, HUE) in the order
        they are applied; factor: (n, 4) float, the factor of each operation (1, 1, 1, 0 when the
        crop is not jittered); gray, blur, solarize: (n,) bool; sigma: (n,) blur sigma.
    """

    order: torch.Tensor
    factor: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


class DeviceAugment:
    """Device half: uint8 crops -> jittered, grayscaled, blurred, solarized, normalised float crops.

    Reads every knob of the :class:`~ibot.data.transforms.AugmentSpec` (default: ``AugmentSpec()``)
    but the crop sizes and scales (the crops arrive cut): the crop counts G and L (crops are
    crop-major in a batch), ``in_chans`` (1: brightness and contrast only, no random grayscale),
    mean/std, the jitter probability and strengths, ``grayscale_p``, ``blur_p`` per crop kind,
    ``blur_sigma`` x ``blur_scale`` and ``solarization_p`` (global crops 2..G).
    """

    def __init__(self, spec: AugmentSpec | None = None) -> None:
        self.spec = spec = spec or AugmentSpec()
        gray = spec.in_chans == 1
        mean, std = spec.normalization()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        brightness, contrast, saturation, hue = spec.brightness, spec.contrast, spec.saturation, spec.hue
        # (low, high) of each operation's factor; saturation and hue are off for one channel
        self.ranges = torch.tensor(
            [
                [max(0.0, 1 - brightness), 1 + brightness],
                [max(0.0, 1 - contrast), 1 + contrast],
                [1.0, 1.0] if gray else [max(0.0, 1 - saturation), 1 + saturation],
                [0.0, 0.0] if gray else [-hue, hue],
            ]
        )
        self.gray_p = 0.0 if gray else spec.grayscale_p  # never for one channel
        self.sigma = spec.sigma_range
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see normalizer

    def normalizer(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) with ``(x - mean) / std == offset + x * scale``, made once per device."""
        if device not in self._norm:
            scale = 1 / self.std
            self._norm[device] = (to_device(scale, device), to_device(-self.mean * scale, device))
        return self._norm[device]

    # ------------------------------------------------------------------ parameters (CPU)
    def sample(self, kinds: torch.Tensor, gen: torch.Generator) -> AugmentParams:
        """Random parameters for rows of crop kinds ``kinds`` (n,) (0: global 1, 1: global 2..G, 2: local)."""
        n = kinds.shape[0]
        jitter = torch.rand(n, generator=gen) < self.spec.color_jitter_p
        order = torch.rand(n, 4, generator=gen).argsort(dim=1)  # a uniform permutation per row
        lo, hi = self.ranges[:, 0], self.ranges[:, 1]
        factor = lo + (hi - lo) * torch.rand(n, 4, generator=gen)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
        factor = torch.where(jitter[:, None], factor, identity)
        gray = torch.rand(n, generator=gen) < self.gray_p
        blur = torch.rand(n, generator=gen) < torch.tensor(self.spec.blur_p)[kinds]
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(n, generator=gen)
        solarize = (torch.rand(n, generator=gen) < self.spec.solarization_p) & (kinds == 1)
        return AugmentParams(order, factor, gray, blur & (self.sigma[1] > 0), sigma, solarize)

    # ------------------------------------------------------------------ operations (device)
    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """(n, C, H, W) uint8 -> (n, C, H, W) float32 normalised, with parameters ``p``."""
        dev = x.device
        x = x.float().div_(255.0)
        to = lambda t: to_device(t, dev)  # noqa: E731
        if bool((p.factor != torch.tensor([1.0, 1.0, 1.0, 0.0])).any()):
            x = self._jitter(x, p, to)
        if bool(p.gray.any()):
            x = torch.where(to(p.gray).view(-1, 1, 1, 1), luma(x).expand_as(x), x)
        rows = p.blur.nonzero().squeeze(1)
        if rows.numel():
            idx = to(rows)
            x = x.index_copy_(0, idx, gaussian_blur(x.index_select(0, idx), p.sigma[rows], self.sigma[1]))
        if bool(p.solarize.any()):
            on = to(p.solarize).view(-1, 1, 1, 1) & (x >= 0.5)  # uint8 >= 128 after rounding
            x = torch.where(on, 1.0 - x, x)
        scale, offset = self.normalizer(dev)
        return torch.addcmul(offset, x, scale)  # (x - mean) / std in one pass

    def _jitter(self, x: torch.Tensor, p: AugmentParams, to) -> torch.Tensor:
        rows = torch.arange(x.shape[0])
        for pos in range(4):
            op = p.order[:, pos]
            f = p.factor[rows, op]
            # brightness, contrast and saturation are blends x * f + other * (1 - f), f = 1 elsewhere
            blend = torch.where(op == HUE, torch.ones_like(f), f)
            if bool((blend != 1).any()):
                fd = to(blend).view(-1, 1, 1, 1)
                gray = luma(x)
                mean = gray.mean(dim=(-2, -1), keepdim=True)
                opd = to(op).view(-1, 1, 1, 1)
                other = torch.where(opd == SATURATION, gray, torch.where(opd == CONTRAST, mean, 0.0))
                x = torch.lerp(other, x, fd).clamp_(0, 1)  # other + f (x - other) in one pass
            hue_rows = ((op == HUE) & (f != 0)).nonzero().squeeze(1)
            if hue_rows.numel():
                idx = to(hue_rows)
                x = x.index_copy_(0, idx, adjust_hue(x.index_select(0, idx), to(f[hue_rows])))
        return x

    # ------------------------------------------------------------------ batches
    def kinds(self, n_global: int, n_local: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop kind of each row of the global (G*B) and local (L*B) tensors (crop-major)."""
        crop = torch.arange(n_global).repeat_interleave(batch_size)
        return (crop > 0).long(), torch.full((n_local * batch_size,), 2, dtype=torch.long)

    def __call__(self, batch, gen: torch.Generator):
        """A :class:`~ibot.data.loader.Batch` of uint8 crops -> the same batch with float crops."""
        from ibot.data.loader import Batch  # the loader imports this module's users, not the reverse

        if batch.batch_size == 0:  # every image unreadable: nothing to augment (the trainer skips the step)
            return batch
        if batch.global_crops.dtype != torch.uint8:
            raise TypeError(f"DeviceAugment takes uint8 crops, got {batch.global_crops.dtype}")
        kg, kl = self.kinds(batch.n_global, batch.n_local, batch.batch_size)
        glob = self.apply(batch.global_crops, self.sample(kg, gen))
        loc = None
        if batch.local_crops is not None:
            loc = self.apply(batch.local_crops, self.sample(kl, gen))
        return Batch(glob, loc, batch.masks, batch.labels, batch.n_global, batch.n_local, batch.n_skipped)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) in [0, 1] -> (n, 1, H, W) Rec. 601 luma (the image itself for one channel)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of (n, 3, H, W) RGB images in [0, 1] by ``shift`` (n,) turns (in [-0.5, 0.5]).

    Value and saturation are unchanged (as torchvision's ``adjust_hue``): only the channel between
    max and min moves, so the HSV -> RGB step is the closed form ``v - c * clamp(min(k, 4 - k), 0, 1)``.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    c = maxc - minc
    safe = torch.where(c > 0, c, torch.ones_like(c))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0) * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = torch.remainder(n + h, 6.0)
        out.append(maxc - c * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(out, 1)


def box_blur_kernels(sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's Gaussian blur as 1-D kernels: (n,) sigmas -> (n, 2R+1), R = ``blur_radius(max(sigma))``.

    ``ImageFilter.GaussianBlur(radius=sigma)`` runs ``passes`` extended box blurs (Gwosdek et al. 2011)
    whose total variance is exactly sigma^2: box radius l + a with
    l = floor((sqrt(12 s2 + 1) - 1) / 2), a = (2l + 1)(l(l + 1) - 3 s2) / (6 (s2 - (l + 1)^2)),
    s2 = sigma^2 / passes. A sampled Gaussian of a small sigma is nearly the identity; this is not.
    """
    s2 = sigma.double() ** 2 / passes
    length = torch.sqrt(12 * s2 + 1)
    lo = torch.floor((length - 1) / 2)
    a = (2 * lo + 1) * (lo * (lo + 1) - 3 * s2) / (6 * (s2 - (lo + 1) ** 2))
    r = int(lo.max()) + 1  # one box's radius; the kernel's is passes * r
    t = torch.arange(-passes * r, passes * r + 1, dtype=torch.float64).abs().view(1, -1)
    box = torch.where(t <= lo.view(-1, 1), 1.0, torch.where(t == lo.view(-1, 1) + 1, a.view(-1, 1), 0.0))
    box = box / box.sum(1, keepdim=True)
    n, c = sigma.shape[0], passes * r
    k, small = box, box[:, c - r : c + r + 1].reshape(n, 1, -1)
    for _ in range(passes - 1):  # k * box, one kernel per row (grouped conv1d; the box is symmetric)
        k = F.conv1d(F.pad(k.view(1, n, -1), (r, r)), small, groups=n).view(n, -1)
    return k.float()


def blur_radius(sigma_max: float, passes: int = 3) -> int:
    """Radius of :func:`box_blur_kernels` for sigmas up to ``sigma_max``."""
    s2 = sigma_max**2 / passes
    return passes * (math.floor((math.sqrt(12 * s2 + 1) - 1) / 2) + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """PIL's Gaussian blur of (m, C, H, W) with one sigma per image (m,), edges replicated (as PIL).

    Separable, with :func:`box_blur_kernels` zero-padded to the fixed radius of ``sigma_max`` (no
    data-dependent shapes on the device).
    """
    m, c, h, w = x.shape
    radius = blur_radius(sigma_max)
    k = box_blur_kernels(sigma.clamp(max=sigma_max))
    k = F.pad(k, ((2 * radius + 1 - k.shape[1]) // 2,) * 2)
    k = to_device(k.to(x.dtype), x.device).repeat_interleave(c, dim=0)  # (m*C, K): per channel
    y = x.reshape(1, m * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(m * c, 1, 1, -1), groups=m * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(m * c, 1, -1, 1), groups=m * c)
    return y.view(m, c, h, w)
