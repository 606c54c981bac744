"""Losses and teacher targets of iBOT / DINO (pure tensor code; no data or model imports)."""

from ibot.losses.criterion import ibot_criterion
from ibot.losses.distillation import cls_distillation_loss, koleo_loss, masked_patch_loss
from ibot.losses.ibot_loss import iBOTLoss
from ibot.losses.teacher import Center, TeacherTemperatures, sinkhorn_knopp, teacher_temperature

__all__ = [
    "Center",
    "cls_distillation_loss",
    "iBOTLoss",
    "ibot_criterion",
    "koleo_loss",
    "masked_patch_loss",
    "sinkhorn_knopp",
    "TeacherTemperatures",
    "teacher_temperature",
]
