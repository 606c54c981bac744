"""Whole-forward ``torch.compile(fullgraph=True)`` of the training loss, with static shapes.

The number of masked tokens changes every batch, which would make every shape downstream of the
masked-token gather dynamic. :func:`pad_mask_batch` pads the gather index and the per-token loss
weights with weight 0, DINOv2's trick: padded rows point at token 0 and add exactly 0 to the loss
and the gradients. The padded size is the batch's count rounded up to one of ``PAD_LEVELS`` sizes
(multiples of the bound, the most tokens the generator can mask, divided by ``PAD_LEVELS``): a few
shapes, each compiled once (within dynamo's default cache of 8 graphs), instead of padding every
batch to the bound (about 0.5 N rows per image against about 0.15 N used with the official ratios). The step's
teacher temperatures enter as a tensor, so a new temperature does not recompile either.

Used for ``run.compile=full``; ``run.compile=blocks`` (or ``true``) compiles each transformer
block instead and keeps the exact unpadded numerics.
"""

from __future__ import annotations

import math

import torch

from ibot.data.masking import MaskBatch

BACKEND = "inductor"  # torch.compile backend of run.compile_mode=full (tests use "eager")


def mask_bound(n_images: int, n_tokens: int, max_ratio: float) -> int:
    """Most masked tokens ``n_images`` masks of ``n_tokens`` can hold at ``max_ratio`` (block and
    random masks never exceed ``ratio * n_tokens`` per image)."""
    return n_images * min(n_tokens, math.floor(max_ratio * n_tokens + 1e-9))


PAD_LEVELS = 8  # padded sizes of run.compile_mode=full: bound / 8, 2 bound / 8, ..., bound


def padded_size(m: int, bound: int, levels: int = PAD_LEVELS) -> int:
    """``m`` masked tokens rounded up to the next of ``levels`` sizes: multiples of ``ceil(bound / levels)``,
    at most ``bound``."""
    step = max(1, -(-bound // levels))
    return min(bound, max(step, -(-m // step) * step))


def pad_mask_batch(mb: MaskBatch, max_ratio: float) -> MaskBatch:
    """``mb`` with ``index`` and ``weight`` padded (index 0, weight 0) to :func:`padded_size` of its
    masked-token count under :func:`mask_bound`.

    Raises ValueError when the batch has more masked tokens than the bound (a generator that
    exceeds its own ratio).
    """
    n_img, n_tok = mb.masks.shape
    bound = mask_bound(n_img, n_tok, max_ratio)
    m = mb.index.numel()
    if m > bound:
        raise ValueError(f"{m} masked tokens exceed the padding bound {bound} (max ratio {max_ratio})")
    pad = padded_size(m, bound) - m
    index = torch.cat([mb.index, mb.index.new_zeros(pad)])
    weight = torch.cat([mb.weight, mb.weight.new_zeros(pad)])
    return MaskBatch(mb.masks, index, weight, mb.n_global)


class CompiledForward:
    """``module(batch=..., temps=..., update_centers=False)`` through one ``torch.compile(fullgraph=True)``
    graph; the caller moves the centers with ``model.update_centers(out.targets)``.

    Needs the official centering (``centering="center"``, ``patch_center="all"``): with padded
    rows, Sinkhorn-Knopp and the masked-token center would count the padding. The batch's masks
    must be padded (:func:`pad_mask_batch`; the trainer's collate does it for ``run.compile=full``).
    """

    def __init__(self, model, module=None, backend=None, mode: str | None = None) -> None:
        if model.use_patch_loss and (model.centering != "center" or model.patch_center != "all"):
            raise ValueError(
                "run.compile=full needs loss.centering=center and the official patch center (padded masked "
                "tokens would enter Sinkhorn-Knopp or the masked-token center); use run.compile=blocks"
            )
        self.model = model
        self._temps: dict[tuple, torch.Tensor] = {}
        # a DDP wrapper must run its own forward (gradient hooks); its graph splits at the buckets
        target, full = (model.forward, True) if module is None else (module, False)
        self._fn = torch.compile(target, fullgraph=full, dynamic=False, backend=backend or BACKEND, mode=mode)

    def temperatures(self, temps: tuple[float, float], device: torch.device) -> torch.Tensor:
        """(2,) device tensor of the (CLS, patch) teacher temperatures, made once per new value."""
        key = (float(temps[0]), float(temps[1]), str(device))
        if key not in self._temps:
            self._temps = {key: torch.tensor(key[:2], device=device)}
        return self._temps[key]

    def __call__(self, *, batch, temps: tuple[float, float], update_centers: bool = False):
        temps = self.temperatures(temps, batch.global_crops.device)
        return self._fn(batch=batch, temps=temps, update_centers=update_centers)


def compile_forward(model, module=None, backend=None, mode: str | None = None) -> CompiledForward:
    """:class:`CompiledForward` of ``model`` (through ``module``, its DDP wrapper, when given)."""
    return CompiledForward(model, module, backend, mode)


__all__ = ["PAD_LEVELS", "CompiledForward", "compile_forward", "mask_bound", "pad_mask_batch", "padded_size"]
