"""Per-iteration schedules, as the official ``utils.cosine_scheduler``."""

from __future__ import annotations

import numpy as np


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up ``linspace(start, base, warmup_epochs * niter)`` then cosine from base to final.

    Returns an array of ``epochs * niter_per_ep`` values, one per iteration.
    """
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    span = max(len(iters), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / span))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def optim_schedules(o, niter_per_ep: int, world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step (lr, weight decay, teacher momentum) of an ``optim`` config section, as the official code.

    The lr peaks at ``o.lr * total batch / 256`` after ``o.warmup_epochs`` (linear scaling rule),
    then follows a cosine to ``o.min_lr``; weight decay and momentum follow cosines to
    ``o.weight_decay_end`` and 1. ``o`` is anything with those attributes (the config's ``optim``).
    """
    total_batch = o.batch_size * world_size
    lr = cosine_scheduler(o.lr * total_batch / 256.0, o.min_lr, o.epochs, niter_per_ep, warmup_epochs=o.warmup_epochs)
    wd = cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, niter_per_ep)
    momentum = cosine_scheduler(o.momentum_teacher, 1.0, o.epochs, niter_per_ep)
    return lr, wd, momentum
