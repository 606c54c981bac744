"""Backbones (mask-aware timm ViT and Swin) and projection head."""

from ibot.models.backbone import MaskedViT, create_vit, interpolate_pos_embed, make_teacher_backbone, wrap_backbone
from ibot.models.grid import grid_size, mask_cell
from ibot.models.head import WeightNormLinear, iBOTHead
from ibot.models.swin import MaskedSwin, is_swin

__all__ = [
    "MaskedSwin",
    "MaskedViT",
    "WeightNormLinear",
    "create_vit",
    "grid_size",
    "iBOTHead",
    "interpolate_pos_embed",
    "is_swin",
    "make_teacher_backbone",
    "mask_cell",
    "wrap_backbone",
]
