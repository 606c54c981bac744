"""``iBOTLoss`` with the official constructor and forward signature (bytedance/ibot main_ibot.py).

A drop-in for code written against the official loss: it takes the full head outputs (every
patch token of every global view), applies the official per-epoch temperature schedules and
centering, and updates both centers after the loss. The loss is :func:`ibot.losses.ibot_criterion`
on every patch token (weight 0 where not masked); the training step of :class:`ibot.iBOT` calls the
same criterion on the masked tokens only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ibot.grid import patch_loss_weights
from ibot.losses.criterion import ibot_criterion
from ibot.losses.teacher import Center, teacher_temperature


class iBOTLoss(nn.Module):  # noqa: N801
    """Official-signature iBOT loss.

    Args follow the official code: prototypes ``out_dim`` / ``patch_out_dim``, crop counts
    ``ngcrops`` / ``nlcrops``, the CLS (``warmup_teacher_temp`` -> ``teacher_temp``) and patch
    (``warmup_teacher_temp2`` -> ``teacher_temp2``) temperatures warmed up over
    ``warmup_teacher_temp_epochs``, ``student_temp``, center momenta, ``lambda1`` / ``lambda2``
    and ``mim_start_epoch``. ``nepochs`` is kept for signature compatibility and validated.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        ngcrops: int,
        nlcrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp2: float,
        teacher_temp2: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        mim_start_epoch: int = 0,
    ) -> None:
        super().__init__()
        if nepochs < warmup_teacher_temp_epochs + mim_start_epoch:
            raise ValueError(
                f"nepochs={nepochs} < warmup_teacher_temp_epochs + mim_start_epoch = "
                f"{warmup_teacher_temp_epochs + mim_start_epoch}; shorten the warm-up or train longer"
            )
        self.ngcrops, self.nlcrops = ngcrops, nlcrops
        self.student_temp = student_temp
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.temps2 = (warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, mim_start_epoch)
        self.cls_center = Center(out_dim, center_momentum)
        self.patch_center = Center(patch_out_dim, center_momentum2)
        # state dicts use the official buffers, ``center`` (1, K) and ``center2`` (1, 1, K_p), so that the
        # official ``restart_from_checkpoint`` (strict=False) restores them; the inner names load too
        self.register_state_dict_post_hook(_official_center_keys)
        self.register_load_state_dict_pre_hook(_from_official_center_keys)

    @property
    def center(self) -> torch.Tensor:
        return self.cls_center.center

    @property
    def center2(self) -> torch.Tensor:
        return self.patch_center.center.unsqueeze(0)

    def forward(self, student_output, teacher_output, student_local_cls, student_mask, epoch: int) -> dict:
        """Official forward.

        Args:
            student_output: (s_cls (G*B, K), s_patch (G*B, N, K_p)) on masked global crops.
            teacher_output: (t_cls (G*B, K), t_patch (G*B, N, K_p)) on unmasked global crops.
            student_local_cls: (L*B, K) or None.
            student_mask: list of V bool masks (B, h, w); only the first G are read.
            epoch: current epoch (temperature schedules).

        Returns:
            dict with scalars ``cls``, ``patch`` and ``loss``.
        """
        s_cls, s_patch = student_output
        t_cls, t_patch = teacher_output
        g = self.ngcrops
        b = t_cls.shape[0] // g
        if student_local_cls is not None:
            s_cls = torch.cat([s_cls, student_local_cls])
        temp = teacher_temperature(epoch, *self.temps)
        temp2 = teacher_temperature(epoch, *self.temps2[:3], start_epoch=self.temps2[3])
        t_probs = self.cls_center.softmax(t_cls, temp).reshape(g, b, -1)
        tp_probs = self.patch_center.softmax(t_patch, temp2)
        masks = torch.cat([m.reshape(m.shape[0], -1) for m in student_mask[:g]])
        k2 = s_patch.shape[-1]
        terms = ibot_criterion(
            s_cls.reshape(-1, b, s_cls.shape[-1]),
            t_probs,
            s_patch.reshape(-1, k2),
            tp_probs.reshape(-1, k2),
            patch_loss_weights(masks, g).reshape(-1),
            student_temp=self.student_temp,
            cls_weight=self.lambda1,
            patch_weight=self.lambda2,
        )
        self.update_center(t_cls, t_patch)
        return {"cls": terms["loss_cls"], "patch": terms["loss_patch"], "loss": terms["loss"]}

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        self.cls_center.update(teacher_cls.float().sum(0), teacher_cls.shape[0])
        self.patch_center.update(teacher_patch.float().mean(1).sum(0), teacher_patch.shape[0])


_INNER = {"center": "cls_center.center", "center2": "patch_center.center"}


def _official_center_keys(module, state_dict, prefix, local_metadata) -> None:
    for official, inner in _INNER.items():
        if prefix + inner in state_dict:
            value = state_dict.pop(prefix + inner)
            state_dict[prefix + official] = value.reshape(1, 1, -1) if official == "center2" else value


def _from_official_center_keys(module, state_dict, prefix, *args) -> None:
    for official, inner in _INNER.items():
        if prefix + official in state_dict:
            state_dict[prefix + inner] = state_dict.pop(prefix + official).reshape(1, -1)
