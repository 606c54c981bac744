"""The model a config describes: :func:`build_model` turns a :class:`ibot.config.Config` into an
:class:`ibot.iBOT` / :class:`ibot.DINO` module."""

from __future__ import annotations

from ibot.builders.data import mask_generator_from_config
from ibot.config import student_masked
from ibot.methods import DINO, iBOT


def build_model(cfg, mask_generator=None):
    """The :class:`ibot.iBOT` / :class:`ibot.DINO` module a config describes.

    An iBOT gets the run's one mask generator, used only for calls that bring no masks: ``mask_generator``
    (a training run passes its collate's, so the run has one), else
    :func:`ibot.builders.data.mask_generator_from_config`, configured as the collate's.
    """
    m, lo, mk = cfg.model, cfg.loss, cfg.mask
    enc = {"patch_size": m.patch_size, "in_chans": m.in_chans}
    names = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "window_size": "window_size"}
    names.update({"depths": "depths", "stage_heads": "num_heads"})  # Swin: one value per stage
    for k, timm_name in names.items():
        if m[k] is not None:
            enc[timm_name] = tuple(m[k]) if k in ("depths", "stage_heads") else m[k]
    common = dict(
        projector_hidden_dim=m.hidden_dim,
        projector_bottleneck_dim=m.bottleneck_dim,
        temperature_student=lo.student_temp,
        temperature_teacher_warmup=lo.warmup_teacher_temp,
        temperature_teacher=lo.teacher_temp,
        warmup_epochs_temperature_teacher=lo.warmup_teacher_temp_epochs,
        ema_decay_start=cfg.optim.momentum_teacher,
        encoder_kwargs=enc,
        image_size=m.img_size,
        drop_path_rate=m.drop_path,
        head_norm=None if m.head_norm == "none" else m.head_norm,
        head_act=m.head_act,
        head_layers=m.head_layers,
        norm_last_layer=m.norm_last_layer,
        centering=lo.centering,
        sinkhorn_iterations=lo.sinkhorn_iterations,
        koleo_loss_weight=lo.koleo_weight,
    )
    if cfg.method == "dino":
        return DINO(m.arch, n_prototypes=m.out_dim, center_momentum=lo.center_momentum, **common)
    return iBOT(
        m.arch,
        n_cls_prototypes=m.out_dim,
        n_patch_prototypes=m.out_dim if m.shared_head else m.patch_out_dim,
        mask_ratio=list(mk.ratio),
        patch_loss_weight=lo.lambda2,
        mask_ratio_var=list(mk.ratio_var),
        mask_shape=mk.shape,
        mask_start_epoch=mk.start_epoch,
        mask_probability=mk.probability,
        shared_head=m.shared_head,
        cls_loss_weight=lo.lambda1,
        temperature_teacher_patch_warmup=lo.warmup_teacher_patch_temp,
        temperature_teacher_patch=lo.teacher_patch_temp,
        center_momentum=lo.center_momentum,
        patch_center=lo.patch_center,
        masked_im_modeling=student_masked(cfg),
        mask_generator=mask_generator or mask_generator_from_config(cfg),
        **common,
    )
