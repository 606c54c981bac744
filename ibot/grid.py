"""The mask grid of a backbone: one definition of the mask cell, shared by the backbones, the config
and the collate (which makes the masks without building a model), and the per-token weights a mask
gives the patch loss, shared by the collate (:class:`ibot.data.masking.MaskBatch`) and the official
signature :class:`ibot.losses.iBOTLoss`.

A ViT's mask cell is its patch: one mask position per patch token. A Swin's is the cell of a
final-stage token, ``patch_size * 2 ** (stages - 1)`` pixels (official ``pred_size = patch_size * 8``
for the four stages of Swin-T: 32 px, a 7 x 7 grid at 224 px): masks are drawn there and expanded to
the patch-embedding grid, so the patch loss compares the cells the mask was drawn on.
"""

from __future__ import annotations

import torch

SWIN_STAGES = 4  # timm's Swin default (Swin-T/S/B/L)


def mask_cell(arch: str, patch_size: int, stages: int | None = None) -> int:
    """Pixels per mask cell of a backbone: a pure function of its architecture.

    Args:
        arch: a timm model name (``swin*`` is a Swin, anything else has one mask position per patch).
        patch_size: the patch-embedding size in pixels.
        stages: a Swin's number of stages (None: :data:`SWIN_STAGES`); ignored for other backbones.
    """
    if not arch.startswith("swin"):
        return patch_size
    return patch_size * 2 ** ((SWIN_STAGES if stages is None else stages) - 1)


def grid_size(height: int, width: int, cell: int, what: str = "the patch size", note: str = "") -> tuple[int, int]:
    """The (h, w) mask grid of an image of ``height`` x ``width`` pixels (an error unless whole cells)."""
    if height % cell or width % cell:
        raise ValueError(f"image size {height}x{width} is not divisible by {what} {cell}{note}")
    return height // cell, width // cell


def patch_loss_weights(masks: torch.Tensor, n_global: int) -> torch.Tensor:
    """Official per-token weights of the patch loss, for every token (a property of the masks).

    Each image's masked tokens are normalised by that image's mask count (at least 1); an image
    with no masked token contributes 0 but still counts in the batch mean over B; the G views are
    averaged. The loss takes these weights as input (:func:`ibot.losses.masked_patch_loss`).

    Args:
        masks: (G*B, N) bool, crop-major.
        n_global: G.

    Returns:
        (G*B, N) fp32 weights, 0 where not masked.
    """
    m = masks.reshape(masks.shape[0], -1).float()
    b = masks.shape[0] // n_global
    count = m.sum(1, keepdim=True).clamp(min=1.0)
    return m / (count * b * n_global)
