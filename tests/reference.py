"""Independent reference of the official iBOT formulas, written from the specification.

Loop form, exactly as ``iBOTLoss.forward`` of bytedance/ibot describes it (ibot-official.md §2):
used only by the tests to check the vectorised library code.
"""

import torch
import torch.nn.functional as F


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
):
    """Returns (loss_cls, loss_patch, new_center, new_center2)."""
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
    new_center2 = center2 * momentum + t_patch.mean(1).sum(0, keepdim=True) / t_patch.shape[0] * (1 - momentum)
    return loss_cls, loss_patch, new_center, new_center2


def ref_sinkhorn(logits, temp, n_iter=3):
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
