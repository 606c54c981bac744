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
    (of ``prototypes_possible``, the most this step's outputs could use; few = collapse to few
    prototypes), ``view_agreement`` of the two global views, the center
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
        "prototypes_possible": min(t.shape[-1], arg.numel()),
        "center_norm": float(model.cls_center.center.norm()),
        "view_agreement": float(agree),
        "feature_rank": rankme(out.embedding.detach()),
        "feature_dim": out.embedding.shape[-1],
    }


FEW_PROTOTYPES = 0.1  # warn when the teacher's argmax uses at most this share of the prototypes it could use


def _advice(cfg, *levers: str) -> str:
    """``try: ...`` with the levers that fit ``cfg`` (its current values named); generic without a config."""
    if cfg is None:
        generic = {
            "lower_temp": "a lower loss.teacher_temp",
            "higher_temp": "a higher loss.teacher_temp",
            "sinkhorn": "loss.centering=sinkhorn",
            "warmup": "a longer optim.warmup_epochs",
            "koleo": "loss.koleo_weight=0.1",
            "lr": "a lower optim.lr",
            "center": "less centering (loss.center_momentum closer to 1)",
        }
        return "try " + ", ".join(generic[k] for k in levers)
    lo, o = cfg.loss, cfg.optim
    t, w = lo.teacher_temp, o.warmup_epochs
    fit = {
        "lower_temp": f"a lower loss.teacher_temp (now {t:g}, e.g. {t * 0.6:.2g})",
        "higher_temp": f"a higher loss.teacher_temp (now {t:g}, e.g. {min(t * 1.5, 0.1):.2g})" if t < 0.1 else None,
        "sinkhorn": "loss.centering=sinkhorn" if lo.centering != "sinkhorn" else None,
        "warmup": f"a longer optim.warmup_epochs (now {w:g}, e.g. {max(2 * w, 1):g})",
        "koleo": "loss.koleo_weight=0.1" if lo.koleo_weight == 0 else None,
        "lr": f"a lower optim.lr (now {o.lr:g}, e.g. {o.lr / 2:g})",
        "center": f"less centering (loss.center_momentum now {lo.center_momentum:g}, e.g. 0.99)"
        if lo.centering == "center" and lo.center_momentum < 0.99
        else None,
    }
    tried = f" (loss.koleo_weight is already {lo.koleo_weight:g})" if "koleo" in levers and lo.koleo_weight else ""
    return "try " + ", ".join(fit[k] for k in levers if fit[k]) + tried


def collapse_kind(rec: dict) -> str | None:
    """Which collapse a logged record of :func:`collapse_monitors` shows: "uniform", "rank" (few
    directions), "one" (one prototype), "few" (at most ``FEW_PROTOTYPES`` of the prototypes the step could
    use: ``prototypes_possible``, min(prototypes, outputs)), or None. None in the first epoch, while the
    teacher is still forming."""
    if not rec or rec["epoch"] < 1:
        return None
    if rec["teacher_entropy"] > 0.97 * rec["teacher_entropy_max"]:
        return "uniform"
    if rec["feature_rank"] < 0.1 * rec["feature_dim"]:
        return "rank"
    possible = rec.get("prototypes_possible") or round(math.exp(rec["teacher_entropy_max"]))
    if rec["prototypes_used"] <= 1:
        return "one"
    return "few" if rec["prototypes_used"] <= FEW_PROTOTYPES * possible else None


def collapse_warning(rec: dict, cfg=None) -> str | None:
    """The warning (with what to try) a logged record of :func:`collapse_monitors` calls for
    (:func:`collapse_kind`), or None. ``cfg``: the run's config, so the advice names levers it has not
    pulled yet, with their values."""
    kind = collapse_kind(rec)
    if kind == "uniform":
        return "warning: teacher outputs are nearly uniform (collapse to uniform): " + _advice(
            cfg, "lower_temp", "center"
        )
    if kind == "rank":
        return (
            f"warning: the teacher's CLS features span few directions (RankMe {rec['feature_rank']:.1f} of "
            f"{rec['feature_dim']}; dimensional collapse, k-NN suffers): " + _advice(cfg, "koleo", "lr", "warmup")
        )
    if kind in ("one", "few"):
        used = rec["prototypes_used"]
        possible = rec.get("prototypes_possible") or round(math.exp(rec["teacher_entropy_max"]))
        return (
            f"warning: teacher outputs are one-hot on few prototypes ({used} of {possible} in use; collapse to "
            f"{'one prototype' if kind == 'one' else 'few prototypes'}): "
            + _advice(cfg, "higher_temp", "sinkhorn", "warmup", "lr")
        )
    return None


class CollapseWarnings:
    """:func:`collapse_warning` at most once per epoch, and "few prototypes" (a partial collapse that
    some runs that learn also show) once per run, silent during the lr warm-up (``optim.warmup_epochs``):
    ``check(rec)`` returns the line to log, or None. The end of the run checks the last record anyway."""

    def __init__(self, cfg=None) -> None:
        self.warned_epoch = -1
        self.cfg = cfg
        self.said_few = False

    def check(self, rec: dict) -> str | None:
        warmup = float(self.cfg.optim.warmup_epochs) if self.cfg is not None else 0.0
        if rec.get("epoch", 0) < warmup:  # the lr warm-up: the teacher is still forming (a long run's first epochs)
            return None
        warn = collapse_warning(rec, self.cfg)
        if not warn or self.warned_epoch == rec["epoch"]:
            return None
        if collapse_kind(rec) == "few":
            if self.said_few:
                return None
            self.said_few = True
        self.warned_epoch = rec["epoch"]
        return f"epoch {rec['epoch']}, step {rec['step']}: {warn}"


__all__ = ["CollapseWarnings", "collapse_kind", "collapse_monitors", "collapse_warning", "rankme"]
