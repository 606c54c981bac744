"""Mask generators (run on the CPU, in the data pipeline) and the precomputed mask batch.

* :func:`block_mask`: BEiT-style blocks exactly as the official ``ImageFolderMask`` (never exceeds
  the target, minimum block area ``(min(h, w) // 3) ** 2``, log-uniform aspect in (0.3, 1/0.3),
  10 attempts per block).
* :func:`random_mask`: exactly ``int(target)`` patches.
* :class:`MaskGenerator`: the per-image ratio of the official ``pred_ratio`` / ``pred_ratio_var``
  pairs, ``pred_start_epoch``, and optionally a DINOv2-style fraction of masked images. It holds no
  epoch: the caller passes the epoch of the masks it asks for (the collate gets it from the sampler).
* :func:`sample_masks`: a batch of masks from a generator and a torch generator (library use).
* :class:`MaskBatch`: the masks of a batch of global crops with their flat indices and loss
  weights, so the training step needs no data-dependent shape computation on the device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ibot.grid import patch_loss_weights


def block_mask(
    h: int,
    w: int,
    target: float,
    rng: random.Random,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    min_patches: int | None = None,
    attempts: int = 10,
) -> np.ndarray:
    """(h, w) bool block mask with at most ``target`` masked cells (official algorithm)."""
    mask = np.zeros((h, w), dtype=bool)
    low = (min(h, w) // 3) ** 2 if min_patches is None else min_patches
    log_ar = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < target:
        max_new = target - count
        delta = 0
        for _ in range(attempts):
            area = rng.uniform(low, max_new)
            ar = math.exp(rng.uniform(*log_ar))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if bw < w and bh < h:
                top = rng.randint(0, h - bh)
                left = rng.randint(0, w - bw)
                new = bh * bw - int(mask[top : top + bh, left : left + bw].sum())
                if 0 < new <= max_new:
                    mask[top : top + bh, left : left + bw] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def random_mask(h: int, w: int, target: float, rng: random.Random) -> np.ndarray:
    """(h, w) bool mask with exactly ``int(target)`` masked cells at random positions."""
    n = h * w
    flat = np.zeros(n, dtype=bool)
    flat[: int(target)] = True
    order = list(range(n))
    rng.shuffle(order)
    return flat[order].reshape(h, w)


def _as_pairs(ratio: float | Sequence[float], var: float | Sequence[float]) -> list[tuple[float, float]]:
    ratios = [float(ratio)] if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    vars_ = [float(var)] if isinstance(var, (int, float)) else [float(v) for v in var]
    if len(vars_) == 1 and len(ratios) > 1:
        vars_ = vars_ * len(ratios)
    if len(vars_) != len(ratios):
        raise ValueError(f"mask ratio {ratios} and ratio var {vars_} must have the same length")
    for m, v in zip(ratios, vars_, strict=True):
        if m - v < 0.0 or m + v > 1.0:
            raise ValueError(f"mask ratio {m} +- {v} leaves [0, 1]")
    return list(zip(ratios, vars_, strict=True))


class MaskGenerator:
    """Samples per-image masks for global crops.

    Args:
        shape: "block" or "rand".
        ratio, ratio_var: the official ``pred_ratio`` / ``pred_ratio_var`` (a float or a list of
            pairs; per image one pair is chosen uniformly and the ratio drawn from U(m - v, m + v)).
        start_epoch: no masking before this epoch (official ``pred_start_epoch``); the epoch is an
            argument of :meth:`__call__` (the generator holds no epoch).
        probability: fraction of images that are masked at all (DINOv2 ``mask_sample_probability``;
            1.0 = every image follows ``ratio``).
        min_patches, aspect: block shape (None = official ``(min(h, w) // 3) ** 2``).
    """

    def __init__(
        self,
        shape: str = "block",
        ratio: float | Sequence[float] = 0.3,
        ratio_var: float | Sequence[float] = 0.0,
        start_epoch: int = 0,
        probability: float = 1.0,
        min_patches: int | None = None,
        aspect: float = 0.3,
    ) -> None:
        if shape not in ("block", "rand"):
            raise ValueError(f"unknown mask shape {shape!r}; use 'block' or 'rand'")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"mask probability must be in [0, 1], got {probability}")
        self.shape = shape
        self.pairs = _as_pairs(ratio, ratio_var)
        self.start_epoch = start_epoch
        self.probability = probability
        self.min_patches = min_patches
        self.aspect = (aspect, 1 / aspect)

    @property
    def max_ratio(self) -> float:
        return max(m + v for m, v in self.pairs)

    def started(self, epoch: int | None) -> bool:
        """Whether masks are drawn at ``epoch`` (None: no epoch given, the masking has started)."""
        return epoch is None or epoch >= self.start_epoch

    def sample_ratio(self, rng: random.Random) -> float:
        """One image's ratio (official ``get_pred_ratio``: all uniforms drawn, then one chosen)."""
        if self.probability < 1.0 and rng.random() >= self.probability:
            return 0.0
        prs = [rng.uniform(m - v, m + v) if v > 0 else m for m, v in self.pairs]
        return rng.choice(prs) if len(prs) > 1 else prs[0]

    def sample_ratios(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) per-image ratios drawn like :meth:`sample_ratio`, vectorised in torch."""
        m = torch.tensor([p[0] for p in self.pairs], dtype=torch.float64)
        v = torch.tensor([p[1] for p in self.pairs], dtype=torch.float64)
        pick = torch.randint(len(self.pairs), (n,), generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        ratios = m[pick] + v[pick] * (2 * u - 1)
        if self.probability < 1.0:
            ratios = ratios * (torch.rand(n, generator=generator, dtype=torch.float64) < self.probability)
        return ratios

    def __call__(self, n: int, h: int, w: int, rng: random.Random, epoch: int | None = None) -> torch.Tensor:
        """(n, h, w) bool masks, one sampled ratio per image; none before ``start_epoch`` (``epoch``
        None: no epoch given, the masking has started)."""
        out = np.zeros((n, h, w), dtype=bool)
        if not self.started(epoch):
            return torch.from_numpy(out)
        for i in range(n):
            target = self.sample_ratio(rng) * h * w
            if target <= 0:
                continue
            if self.shape == "block":
                out[i] = block_mask(h, w, target, rng, self.aspect, self.min_patches)
            else:
                out[i] = random_mask(h, w, target, rng)
        return torch.from_numpy(out)


def sample_masks(
    mask_generator: MaskGenerator,
    n_images: int,
    grid: tuple[int, int],
    generator: torch.Generator | None = None,
    epoch: int | None = None,
) -> torch.Tensor:
    """(n_images, h, w) bool masks on the CPU from ``mask_generator``, drawn from a torch generator.

    For library code that has views but no collate (``iBOT.forward`` without masks): "rand" masks
    are vectorised in torch, block masks are drawn by the generator from a seed taken from
    ``generator``. ``epoch`` (None: started) decides the mask start as :meth:`MaskGenerator.__call__`.
    """
    h, w = grid
    if mask_generator.shape == "rand":
        if mask_generator.started(epoch):
            ratios = mask_generator.sample_ratios(n_images, generator)
        else:
            ratios = torch.zeros(n_images, dtype=torch.float64)
        return random_masks_torch(n_images, h * w, ratios, generator).reshape(n_images, h, w)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return mask_generator(n_images, h, w, random.Random(seed), epoch)


def random_masks_torch(
    n: int, num_patches: int, ratio: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Vectorised random masks: (n, N) bool with exactly ``int(ratio_i * N)`` True per row."""
    ratio = torch.as_tensor(ratio, dtype=torch.float64).expand(n)
    k = torch.floor(ratio * num_patches + 1e-9).long()
    ranks = torch.rand(n, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < k.unsqueeze(1)


@dataclass
class MaskBatch:
    """Masks of the G global crops of a batch, with what the step needs precomputed.

    Attributes:
        masks: (G*B, N) bool, crop-major (crop 0's B images first), row-major grid positions.
        index: (M,) long, flat indices of the masked tokens into the (G*B*N) token rows.
        weight: (M,) fp32, official patch-loss weight of each masked token.
        n_global: G.
    """

    masks: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    n_global: int

    @classmethod
    def from_masks(cls, masks: torch.Tensor | Sequence[torch.Tensor], n_global: int | None = None) -> MaskBatch:
        """Build from (G*B, N) / (G*B, h, w) bool masks or a list of G (B, h, w) masks.

        Call it where the masks are made (CPU collate): ``nonzero`` there costs no device sync.
        """
        if isinstance(masks, (list, tuple)):
            n_global = len(masks)
            masks = torch.cat([m.reshape(m.shape[0], -1) for m in masks])
        if n_global is None:
            raise ValueError("n_global is needed when masks is a single tensor")
        masks = masks.reshape(masks.shape[0], -1).bool()
        if masks.shape[0] % n_global:
            raise ValueError(f"{masks.shape[0]} masks cannot be split into {n_global} global crops")
        flat = masks.reshape(-1)
        index = flat.nonzero().squeeze(1)
        weight = patch_loss_weights(masks, n_global).reshape(-1)[index]
        return cls(masks, index, weight, n_global)

    @property
    def num_masked(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> MaskBatch:
        return MaskBatch(
            self.masks.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            self.weight.to(device, non_blocking=non_blocking),
            self.n_global,
        )

    def pin_memory(self) -> MaskBatch:
        return MaskBatch(self.masks.pin_memory(), self.index.pin_memory(), self.weight.pin_memory(), self.n_global)
