"""Optimizer parameter groups, gradient clipping and last-layer freezing (official semantics)."""

from __future__ import annotations

import torch
import torch.nn as nn


def param_groups(module: nn.Module) -> list[dict]:
    """Official groups: decay on every >= 2-D parameter not named ``*.bias`` (includes cls_token,
    pos_embed, masked_embed, weight_v, and weight_g when trainable); no decay on biases and 1-D
    parameters. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_param(params: list[torch.Tensor], clip: float) -> None:
    """Official per-parameter clipping: ``g *= min(1, clip / (||g|| + 1e-6))`` for each tensor.

    Stacked ``_foreach`` ops: one norm over the list, the P factors computed as one (P,) tensor,
    one multiply over the list (about 6 launches whatever P is, no host synchronisation). The
    factors are the same fp32 element-wise operations as one scalar per parameter, so the result
    is bit-identical to the official loop (``tests/train/test_step.py``).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        norms = torch.stack(torch._foreach_norm(group))
        factors = (clip / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(group, factors.unbind(0))


def clip_gradients(params: list[torch.Tensor], clip: float, mode: str = "param") -> None:
    if clip <= 0:
        return
    if mode == "param":
        clip_gradients_per_param(params, clip)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)


def drop_last_layer_grads(module: nn.Module) -> None:
    """Drop the gradients of every parameter named ``*last_layer*`` (the prototypes).

    The official ``cancel_gradients_last_layer`` during the first ``optim.freeze_last_layer`` epochs:
    :attr:`ibot.train.schedules.StepValues.freeze_last_layer` says when.
    """
    for name, p in module.named_parameters():
        if "last_layer" in name:
            p.grad = None
