"""Teacher targets: temperature schedules, EMA centering, Sinkhorn-Knopp.

All softmax work is done in fp32 with max subtraction, whatever the logits' dtype.
Shapes: R rows (samples or tokens), K prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ibot.distributed import all_reduce_max, all_reduce_sum


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int, start_epoch: int = 0) -> float:
    """Per-epoch teacher temperature of the official schedule.

    ``start_epoch`` epochs at ``warmup_temp``, then ``linspace(warmup_temp, temp, warmup_epochs)``
    (endpoint included, so the last warm-up epoch already uses ``temp``), then ``temp``.
    """
    e = epoch - start_epoch
    if e < 0:
        return warmup_temp
    if e >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * e / (warmup_epochs - 1)


@dataclass(frozen=True)
class TeacherTemperatures:
    """The official per-epoch (CLS, patch) teacher temperatures: linear warm-ups over ``warmup_epochs``
    (:func:`teacher_temperature`), the patch one starting at ``patch_start_epoch`` (the mask start).

    One object holds a run's parameters: the model's (``iBOT.teacher_temps``), which the run's
    :class:`ibot.train.schedules.Schedules` reads.
    """

    warmup_cls: float = 0.04
    cls: float = 0.04
    warmup_patch: float = 0.04
    patch: float = 0.07
    warmup_epochs: int = 30
    patch_start_epoch: int = 0

    def __call__(self, epoch: int) -> tuple[float, float]:
        cls_t = teacher_temperature(epoch, self.warmup_cls, self.cls, self.warmup_epochs)
        patch_t = teacher_temperature(epoch, self.warmup_patch, self.patch, self.warmup_epochs, self.patch_start_epoch)
        return cls_t, patch_t


class Center(nn.Module):
    """EMA center of raw teacher logits (official momentum 0.9), all-reduced over ranks.

    ``center`` has shape (1, K). ``softmax`` uses the current value; call ``update`` after the
    loss so that a step uses the center of the previous steps, as the official code does.
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def softmax(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """(*, K) logits -> (*, K) fp32 probabilities ``softmax((logits - center) / temp)``."""
        return torch.softmax((logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, row_sum: torch.Tensor, n_rows: int, apply: torch.Tensor | None = None) -> None:
        """EMA toward the mean row. ``row_sum`` (K,) is this rank's sum over its ``n_rows`` rows.

        ``apply`` (0-d bool, on the device) keeps the center unchanged where False (a skipped
        step), without a host synchronisation; no tensor is built on the host.
        """
        row_sum = row_sum.float().reshape(-1)
        stats = torch.cat([row_sum, row_sum.new_full((1,), float(n_rows))])
        all_reduce_sum(stats)
        count = stats[-1]
        mean = stats[:-1] / count.clamp(min=1)
        new = self.center * self.momentum + mean.unsqueeze(0) * (1 - self.momentum)
        keep = count > 0  # no rows anywhere (e.g. no masked token): keep the center as it is
        if apply is not None:
            keep = keep & apply
        self.center.copy_(torch.where(keep, new, self.center))


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2), distributed-aware.

    Args:
        logits: (R, K) teacher logits of this rank.
        temp: teacher temperature.
        n_iterations: alternating normalisations.

    Returns:
        (R, K) fp32 assignments whose rows sum to 1 and whose columns, summed over every rank,
        are equal. The global max is subtracted before ``exp`` (it cancels in the first
        normalisation), so large logits cannot overflow.
    """
    scores = logits.float() / temp
    peak = scores.max().reshape(1).clone() if scores.numel() else scores.new_zeros(1)
    all_reduce_max(peak)
    q = torch.exp(scores - peak).t()  # (K, R)
    k = q.shape[0]
    n = all_reduce_sum(q.new_full((1,), float(q.shape[1])))  # a fill on the device, no host copy
    total = all_reduce_sum(q.sum().reshape(1))
    q = q / total.clamp(min=torch.finfo(torch.float32).tiny)
    for _ in range(n_iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / rows.clamp(min=torch.finfo(torch.float32).tiny) / k
        q = q / q.sum(dim=0, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / n
    return (q * n).t()
