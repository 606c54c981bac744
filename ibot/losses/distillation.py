"""Self-distillation cross-entropies of iBOT: CLS across views, patches on masked tokens.

Pure tensor code; the student temperature is applied here, the teacher side is prepared by
:mod:`ibot.losses.teacher`. Cross-entropy runs in fp32 (``log_softmax`` subtracts the max).
Shapes: G global views, V = G + L student views, B images per view, K prototypes,
N patch tokens per image, M masked tokens in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float = 0.1
) -> torch.Tensor:
    """DINO cross-view loss, averaged over the G * (V - 1) (teacher, student) view pairs.

    Every teacher global view is paired with every student view except the same view; local
    views are students only. Vectorised: the pair sum is (sum_q T_q) . (sum_v log S_v) minus the
    G same-view terms, so the cost is O((G + V) B K) instead of a loop over G V pairs.

    Args:
        student_logits: (V, B, K), the G global views first, crop-major.
        teacher_probs: (G, B, K) teacher targets (centered softmax or Sinkhorn-Knopp).
        student_temp: student temperature.

    Returns:
        scalar loss.
    """
    v, g = student_logits.shape[0], teacher_probs.shape[0]
    if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            f"expected student (V, B, K) and teacher (G, B, K); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    if g > v or v < 2:
        raise ValueError(f"need at least 2 views and G <= V; got G={g}, V={v}")
    t = teacher_probs.float()
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    all_pairs = (t.sum(0) * log_s.sum(0)).sum(-1)  # (B,)
    same_view = (t * log_s[:g]).sum(-1).sum(0)  # (B,)
    return -(all_pairs - same_view).mean() / (g * (v - 1))


def masked_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    weight: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Masked-patch self-distillation on the M masked tokens only.

    Args:
        student_logits: (M, K) student logits at masked positions.
        teacher_probs: (M, K) teacher targets at the same positions (same view).
        weight: (M,) per-token weight, an input: the masks own it
            (:func:`ibot.grid.patch_loss_weights`, the official 1 / (mask count of the
            token's image * B * G)).
        student_temp: student temperature.

    Returns:
        scalar ``sum_m weight_m * CE_m`` (0 when M = 0).
    """
    ce = -(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    return (ce * weight).sum()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (DINOv2) on (B, D) features of one view.

    ``-mean_i log(||x_i - x_nn(i)|| + eps)`` after L2 normalisation, in fp32. With fewer than two
    rows there is no neighbour and the loss is 0 (still attached to the graph).
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    dist = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()
