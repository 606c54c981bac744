"""The iBOT criterion: one pure function from student logits and teacher targets to the loss terms.

Used by :meth:`ibot.iBOT.step` (masked tokens only, per-token weights from the collate's
:class:`ibot.data.masking.MaskBatch`) and by :class:`ibot.losses.iBOTLoss` (the official signature:
every token, weight 0 where not masked). It holds no state: temperatures of the teacher side are
already in the targets, the centers are updated by the caller.

Shapes: G global views, V = G + L student views, B images per view, K / K_p CLS / patch prototypes,
M patch rows the patch term reads, D feature width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ibot.losses.distillation import cls_distillation_loss, koleo_loss, masked_patch_loss


def ibot_criterion(
    student_cls: torch.Tensor,
    teacher_cls_probs: torch.Tensor,
    student_patch: torch.Tensor | None = None,
    teacher_patch_probs: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    *,
    student_temp: float = 0.1,
    cls_weight: float = 1.0,
    patch_weight: float = 1.0,
    koleo_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    koleo_weight: float = 0.0,
) -> dict[str, torch.Tensor | None]:
    """``cls_weight * CLS + patch_weight * patch + koleo_weight * KoLeo`` (iBOT's ``lambda1``, ``lambda2``).

    Args:
        student_cls: (V, B, K) student CLS logits, the G global views first, crop-major.
        teacher_cls_probs: (G, B, K) teacher CLS targets (centered softmax or Sinkhorn-Knopp).
        student_patch: (M, K_p) student logits of the patch rows, or None (no patch term).
        teacher_patch_probs: (M, K_p) teacher targets of the same rows.
        token_weight: (M,) per-row weight (:func:`ibot.grid.patch_loss_weights`: the
            official per-image mean over masked tokens, then the mean over images and views; 0 for
            rows that do not count).
        student_temp: student temperature.
        cls_weight, patch_weight, koleo_weight: weights of the three terms.
        koleo_features: the student's global CLS features, G tensors (B, D) or a (G, B, D) tensor;
            KoLeo is averaged over the G views. Ignored when ``koleo_weight`` is 0.

    Returns:
        ``{"loss", "loss_cls", "loss_patch", "loss_koleo"}``: scalars; a term that is off is None.
    """
    loss_cls = cls_weight * cls_distillation_loss(student_cls, teacher_cls_probs, student_temp)
    loss = loss_cls
    loss_patch = loss_koleo = None
    if student_patch is not None:
        loss_patch = patch_weight * masked_patch_loss(student_patch, teacher_patch_probs, token_weight, student_temp)
        loss = loss + loss_patch
    if koleo_weight > 0 and koleo_features is not None:
        loss_koleo = koleo_weight * torch.stack([koleo_loss(c) for c in koleo_features]).mean()
        loss = loss + loss_koleo
    return {"loss": loss, "loss_cls": loss_cls, "loss_patch": loss_patch, "loss_koleo": loss_koleo}
