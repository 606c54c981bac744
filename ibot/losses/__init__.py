"""Losses and teacher targets of iBOT / DINO (pure tensor code)."""

from ibot.losses.distillation import (
    cls_distillation_loss,
    dense_patch_loss,
    koleo_loss,
    masked_patch_loss,
    patch_loss_weights,
)
from ibot.losses.ibot_loss import iBOTLoss
from ibot.losses.teacher import Center, sinkhorn_knopp, teacher_temperature

__all__ = [
    "Center",
    "cls_distillation_loss",
    "dense_patch_loss",
    "iBOTLoss",
    "koleo_loss",
    "masked_patch_loss",
    "patch_loss_weights",
    "sinkhorn_knopp",
    "teacher_temperature",
]
