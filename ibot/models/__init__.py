"""Backbone (mask-aware timm ViT) and projection head."""

from ibot.models.backbone import MaskedViT, create_vit, interpolate_pos_embed, make_teacher_backbone
from ibot.models.head import WeightNormLinear, iBOTHead

__all__ = ["MaskedViT", "WeightNormLinear", "create_vit", "iBOTHead", "interpolate_pos_embed", "make_teacher_backbone"]
