"""Any timm backbone as a DINO encoder: its pooled features stand in for the class token.

A ResNet, ConvNeXt, or a ViT without a class token has no [CLS] and no mask token, so it can
train with :class:`ibot.DINO` (the CLS loss only) but not with iBOT's masked-patch loss. The
features are what ``timm.create_model(name, num_classes=0)`` returns: the model's own pooling
(global average for CNNs). Shapes: B batch, C channels, H/W image size, D ``num_features``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PooledBackbone(nn.Module):
    """A timm model with ``num_classes=0``: (B, C, H, W) -> pooled (B, D) features, no patch tokens.

    The last-block skip of :class:`ibot.models.MaskedViT` (``forward(rows=)``) does not apply: the
    pooled features read every final activation (:meth:`ibot.iBOT.reads` gives None).

    Args:
        model: a timm model built with ``num_classes=0`` (its forward returns pooled features), or
            any module that maps (B, 3, H, W) images to (B, D) features (or (B, N, D) tokens).
        masked_im_modeling: must be False; such models have no patch tokens to mask.
    """

    def __init__(self, model: nn.Module, masked_im_modeling: bool = False) -> None:
        super().__init__()
        name = type(model).__name__
        if masked_im_modeling:
            raise ValueError(
                f"iBOT's masked-patch loss needs a timm ViT with a class token (no register tokens) or a Swin, "
                f"not {name}: use ibot.DINO (or masked_im_modeling=False, patch_loss_weight=0) for this backbone"
            )
        if getattr(model, "num_classes", 0):
            raise ValueError(f"{name} has a classifier (num_classes={model.num_classes}); build it with num_classes=0")
        self.model = model
        self.embed_dim: int = int(getattr(model, "num_features", 0) or self._probe_width())
        self.masked_embed = None
        self.patch_size = None
        self.mask_cell = None  # no patch grid
        self.efficient_drop_path = False

    @torch.no_grad()
    def _probe_width(self) -> int:
        """Feature width of a non-timm module, from one forward of a (2, 3, 64, 64) zero batch."""
        was_training = self.model.training
        self.model.eval()
        try:
            width = self(torch.zeros(2, 3, 64, 64))[0].shape[-1]
        finally:
            self.model.train(was_training)
        return int(width)

    @property
    def timm_model(self) -> nn.Module:
        return self.model

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        raise ValueError(f"{type(self.model).__name__} has no patch grid (pooled features only)")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(B, C, H, W) -> pooled features (B, D) and ``None`` patch tokens."""
        if mask is not None:
            raise ValueError(f"{type(self.model).__name__} has no patch tokens to mask")
        feats = self.model(x)
        if feats.ndim == 3:  # a sequence model that does not pool: take its first token
            feats = feats[:, 0]
        return feats, None

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled features (B, D): the features used by k-NN."""
        return self(x)[0]
