"""Baselines beside every score: raw pixels and the untrained model, on the same split and protocol.

A k-NN or linear-probe accuracy means little alone: a small folder of photos can score 70% with a
model that learned nothing. :func:`untrained_backbone` rebuilds a run's model at step 0 (the run's
config and seed, the global random state left as it was); :func:`pixel_encoder` is the raw-pixel
"model" (flattened normalised pixels at the evaluation resolution; the protocols L2-normalise them as
any feature). :class:`BaselineCache` keeps the scores in ``RUN/baselines.json`` (one computation per
run folder, split and protocol); :func:`score_line` prints a score with its binomial standard error
and its gain over each baseline; :func:`no_gain_warning` says when training added nothing.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from ibot.builders.model import build_model
from ibot.config import from_dict

CACHE_FILE = "baselines.json"
SE_BELOW = 2000  # print the standard error when the held-out split has fewer images than this


def pixel_encoder(x: torch.Tensor) -> torch.Tensor:
    """The raw-pixel features of a batch of normalised images: (B, C * H * W)."""
    return x.flatten(1)


def untrained_backbone(config: dict, which: str = "teacher") -> tuple[torch.nn.Module, str]:
    """``(backbone, description)`` of a run's model before its first step: its config's model built with
    its ``run.seed`` as the trainer builds it (the ``run.init_from`` weights when it starts from some).

    The global torch and Python random states are restored afterwards, so a run's random stream does
    not depend on whether its baselines were computed.
    """
    cfg = from_dict(config)
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        try:
            model = build_model(cfg)
        finally:
            random.setstate(state)
    what = f"untrained (seed {cfg.run.seed})"
    if cfg.run.init_from:
        from ibot.builders.sources import init_model_from

        init_model_from(model, cfg.run.init_from)
        what = f"at init ({cfg.run.init_from})"
    part = model.teacher if which == "teacher" else model.student
    return part["backbone"], what


def binomial_se(top1: float, n: int) -> float:
    """Standard error (percentage points) of an accuracy ``top1`` (percent) measured on ``n`` images:
    ``sqrt(p (1 - p) / n)``, with ``p`` kept half an image from 0% and 100% (where it would claim
    no uncertainty at all)."""
    n = max(n, 1)
    p = min(max(top1 / 100.0, 0.5 / n), 1 - 0.5 / n)
    return 100.0 * math.sqrt(p * (1 - p) / n)


def score_line(label: str, top1: float, n_test: int, baselines: dict | None) -> str:
    """``k-NN 78.3% ± 5.3 | untrained 71.7% (+6.6) | pixels 83.3% (-5.0)``: the score, its standard
    error when the split is small (< ``SE_BELOW`` images), and its gain over each baseline's top-1."""
    line = f"{label} {top1:.1f}%"
    if n_test < SE_BELOW:
        line += f" ± {binomial_se(top1, n_test):.1f}"
    for name, res in (baselines or {}).items():
        if isinstance(res, dict) and "top1" in res:
            line += f" | {name} {res['top1']:.1f}% ({top1 - res['top1']:+.1f})"
    return line


def no_gain_warning(top1: float, baselines: dict | None, cfg) -> str | None:
    """The end-of-run warning (with what to try) when the model is within 1 point of the untrained one,
    or more than 5 points below raw pixels; None when it learned something."""
    b = baselines or {}
    untrained = b.get("untrained", {}).get("top1")
    pixels = b.get("pixels", {}).get("top1")
    o = cfg.optim
    longer = f"optim.epochs={2 * o.epochs}" if o.epochs < 400 else "more images"
    if untrained is not None and untrained >= 99.0:
        return (
            f"note: the untrained model already scores {untrained:.1f}% on this split, so the k-NN cannot show "
            "what training added; evaluate on a harder labelled set (--dataset / --data of `ibot knn`)"
        )
    if untrained is not None and top1 - untrained < 1.0:
        return (
            f"warning: nothing was learned: k-NN {top1:.1f}% is within 1 point of the untrained model's "
            f"{untrained:.1f}% ({top1 - untrained:+.1f}). Try: train longer ({longer}; now {o.epochs} epochs), "
            f"a lower optim.lr (now {o.lr:g}, e.g. {o.lr / 2:g}), and check the collapse warnings above"
        )
    if pixels is not None and pixels - top1 > 5.0:
        return (
            f"warning: raw pixels beat the model by {pixels - top1:.1f} points (k-NN {top1:.1f}% vs {pixels:.1f}%): "
            f"the features are worse than the images themselves. Try: train longer ({longer}), a smaller model "
            "for few images, or start from pretrained weights (run.init_from=CHECKPOINT)"
        )
    return None


class BaselineCache:
    """Baseline scores kept in ``folder/baselines.json``, keyed by everything they depend on (split,
    protocol, image size, seed, model config, device type); ``folder=None``: nothing is kept."""

    def __init__(self, folder: str | Path | None, log=print) -> None:
        self.path = Path(folder) / CACHE_FILE if folder else None
        self.log = log

    def _entries(self) -> dict:
        if not (self.path and self.path.is_file()):
            return {}
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.log(f"baselines: {self.path} is unreadable; recomputing")
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: dict, compute) -> dict:
        """The cached value of ``key``, else ``compute()`` (stored for the next call)."""
        text = json.dumps(key, sort_keys=True, default=str)
        entries = self._entries()
        if text in entries:
            return {**entries[text], "cached": True}
        value = compute()
        if self.path:
            entries[text] = value
            try:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(entries, indent=1))
                tmp.replace(self.path)
            except OSError as err:
                self.log(f"baselines: not cached ({self.path}: {err.strerror or err})")
        return value


def compute_baselines(scores: dict, key: dict, cache: BaselineCache, log=print) -> dict:
    """``{name: result}`` of each ``scores[name]()`` (a callable, or a string: the reason it is skipped,
    logged), through ``cache`` under ``key`` plus the baseline's name."""
    out = {}
    for name, score in scores.items():
        if isinstance(score, str):
            log(f"baselines: {name} skipped ({score})")
            continue
        out[name] = cache.get({**key, "baseline": name}, score)
    reused = [n for n, v in out.items() if v.pop("cached", False)]
    if reused:
        log(f"baselines: reusing {', '.join(reused)} from {cache.path}")
    return out


__all__ = [
    "BaselineCache",
    "binomial_se",
    "compute_baselines",
    "no_gain_warning",
    "pixel_encoder",
    "score_line",
    "untrained_backbone",
]
