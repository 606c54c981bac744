"""Collapse monitors of a pretraining run and the warnings they raise.

:func:`collapse_monitors` reads one step's teacher outputs (entropy, prototypes used, view
agreement, center norm, RankMe of the CLS features); :func:`collapse_warning` turns a logged record
into advice; :class:`CollapseWarnings` says it at most once per epoch.
"""

from __future__ import annotations

import math

import torch


def rankme(features: torch.Tensor) -> float:
    """Effective rank of (N, D) features: ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (RankMe,
    Garrido et al. 2023), between 1 (every row the same direction) and ``min(N, D)``. A value far
    below the width means dimensional collapse, which hurts k-NN even when the head looks healthy."""
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_monitors(model, out, teacher_temp: float) -> dict:
    """Collapse monitors of one training step, from the teacher's CLS logits ``out.teacher_logits``.

    ``teacher_entropy`` (near ``teacher_entropy_max`` = collapse to uniform), ``prototypes_used``
    (near 1 = collapse to one prototype), ``view_agreement`` of the two global views, the center
    norm, and the RankMe ``feature_rank`` of the teacher CLS features (of ``feature_dim``).
    """
    t = out.teacher_logits.float()  # (G, B, K)
    # the targets the loss used (the center before this step's update), not a re-centering
    probs = out.teacher_probs if model.centering == "center" else torch.softmax(t / teacher_temp, -1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    arg = t.argmax(-1)
    agree = (arg[0] == arg[1]).float().mean() if t.shape[0] > 1 else torch.tensor(float("nan"))
    return {
        "teacher_entropy": float(entropy),
        "teacher_entropy_max": math.log(t.shape[-1]),
        "prototypes_used": int(arg.unique().numel()),
        "prototypes_used_frac": arg.unique().numel() / t.shape[-1],
        "center_norm": float(model.cls_center.center.norm()),
        "view_agreement": float(agree),
        "feature_rank": rankme(out.embedding.detach()),
        "feature_dim": out.embedding.shape[-1],
    }


def collapse_warning(rec: dict) -> str | None:
    """The warning (with what to try) a logged record of :func:`collapse_monitors` calls for, or None.

    Silent in the first epoch, while the teacher is still forming.
    """
    if rec["epoch"] < 1:
        return None
    if rec["teacher_entropy"] > 0.97 * rec["teacher_entropy_max"]:
        return (
            "warning: teacher outputs are nearly uniform (collapse to uniform): try a lower "
            "loss.teacher_temp or less centering (loss.center_momentum closer to 1)"
        )
    if rec["feature_rank"] < 0.1 * rec["feature_dim"]:
        return (
            f"warning: the teacher's CLS features span few directions (RankMe {rec['feature_rank']:.1f} of "
            f"{rec['feature_dim']}; dimensional collapse, k-NN suffers): try loss.koleo_weight=0.1"
        )
    if rec["prototypes_used"] <= 1:
        return (
            "warning: teacher outputs are one-hot on few prototypes (collapse to one prototype): try a higher "
            "loss.teacher_temp, loss.centering=sinkhorn, or a longer optim.warmup_epochs"
        )
    return None


class CollapseWarnings:
    """:func:`collapse_warning` at most once per epoch: ``check(rec)`` returns the line to log, or None."""

    def __init__(self) -> None:
        self.warned_epoch = -1

    def check(self, rec: dict) -> str | None:
        warn = collapse_warning(rec)
        if not warn or self.warned_epoch == rec["epoch"]:
            return None
        self.warned_epoch = rec["epoch"]
        return f"epoch {rec['epoch']}, step {rec['step']}: {warn}"


__all__ = ["CollapseWarnings", "collapse_monitors", "collapse_warning", "rankme"]
