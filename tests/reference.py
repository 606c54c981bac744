"""Oracle of the official iBOT formulas, for the parity tests only.

What this is: our own loop-form re-typing of the formulas of bytedance/ibot (commit da316d8), written
from reading ``main_ibot.py`` (``iBOTLoss``: per-epoch temperature schedules, loss, center updates)
and ``utils.py`` (``cosine_scheduler``, ``get_params_groups``, ``clip_gradients``,
``cancel_gradients_last_layer``), plus the Sinkhorn-Knopp of SwAV/DINOv2. It is not the official
code and was not run against it here; it keeps the official structure (loops over view pairs, one
parameter at a time, numpy schedules) so that a vectorised library function and this oracle agree
only if they compute the same thing.

It imports torch, numpy and nothing of the ``ibot`` package, so a bug in the package cannot leak
into the expected values.
"""

import numpy as np
import torch
import torch.nn.functional as F


def ref_teacher_temp_schedule(warmup_temp, temp, warmup_epochs, nepochs, start_epoch=0):
    """Official per-epoch teacher temperature array (``iBOTLoss.teacher_temp{,2}_schedule``)."""
    if start_epoch == 0:
        return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(nepochs - warmup_epochs) * temp))
    return np.concatenate(
        (
            np.ones(start_epoch) * warmup_temp,
            np.linspace(warmup_temp, temp, warmup_epochs),
            np.ones(nepochs - warmup_epochs - start_epoch) * temp,
        )
    )


def ref_ibot_loss(
    s_cls,
    s_patch,
    t_cls,
    t_patch,
    s_local_cls,
    masks,
    center,
    center2,
    temp,
    temp2,
    ngcrops,
    lambda1=1.0,
    lambda2=1.0,
    student_temp=0.1,
    momentum=0.9,
    momentum2=None,
):
    """Official ``iBOTLoss.forward`` + ``update_center`` (one process).

    ``temp`` / ``temp2`` are the CLS / patch teacher temperatures of the epoch; ``momentum`` /
    ``momentum2`` the CLS / patch center momenta (``momentum2`` defaults to ``momentum``).
    Returns (loss_cls, loss_patch, new_center (1, K), new_center2 (1, 1, K_p)).
    """
    momentum2 = momentum if momentum2 is None else momentum2
    if s_local_cls is not None:
        s_cls = torch.cat([s_cls, s_local_cls])
    n_views = s_cls.shape[0] // (t_cls.shape[0] // ngcrops)
    s_chunks = (s_cls / student_temp).chunk(n_views)
    sp_chunks = (s_patch / student_temp).chunk(ngcrops)
    t_chunks = F.softmax((t_cls - center) / temp, dim=-1).chunk(ngcrops)
    tp_chunks = F.softmax((t_patch - center2) / temp2, dim=-1).chunk(ngcrops)
    total1, n1, total2, n2 = 0.0, 0, 0.0, 0
    for q in range(len(t_chunks)):
        for v in range(n_views):
            if v == q:
                loss2 = torch.sum(-tp_chunks[q] * F.log_softmax(sp_chunks[v], dim=-1), dim=-1)
                m = masks[v].flatten(-2, -1).float()
                loss2 = torch.sum(loss2 * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)
                total2 = total2 + loss2.mean()
                n2 += 1
            else:
                loss1 = torch.sum(-t_chunks[q] * F.log_softmax(s_chunks[v], dim=-1), dim=-1)
                total1 = total1 + loss1.mean()
                n1 += 1
    loss_cls = total1 / n1 * lambda1
    loss_patch = total2 / n2 * lambda2
    new_center = center * momentum + t_cls.sum(0, keepdim=True) / t_cls.shape[0] * (1 - momentum)
    new_center2 = center2 * momentum2 + t_patch.mean(1).sum(0, keepdim=True) / t_patch.shape[0] * (1 - momentum2)
    return loss_cls, loss_patch, new_center, new_center2


def ref_sinkhorn(logits, temp, n_iter=3):
    """Sinkhorn-Knopp targets as DINOv2 writes them (one process)."""
    q = torch.exp(logits / temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def ref_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Official ``utils.cosine_scheduler``: per-iteration array, linear warm-up then cosine."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def ref_params_groups(model):
    """Official ``utils.get_params_groups``: [decayed, not decayed (weight_decay 0)], frozen ones left out."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def ref_clip_gradients(model, clip):
    """Official ``utils.clip_gradients``: each gradient on its own, ``g *= clip / (||g|| + 1e-6)`` if that is < 1."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.mul_(clip_coef)
    return norms


def ref_cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Official ``utils.cancel_gradients_last_layer``: drop ``*last_layer*`` gradients before ``freeze_last_layer``."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None
