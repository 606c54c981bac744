"""``ibot`` plugin for the peer step harness (``../shared/bench/peer_step.py``).

Runs ``ibot``'s real training step (:class:`ibot.train.step.TrainStep`, the code ``ibot pretrain``
runs) on the harness's configs, inputs and block masks:

    python ../shared/bench/peer_step.py --plugin benchmarks/peer_plugin.py \\
        --impls official,lightly,ibot,ibot_masked --configs S,S0,T

Implementations:
  ibot         faithful default: official all-token patch center (the teacher head runs on every
               global patch token, no grad), student head on CLS + masked tokens only.
  ibot_masked  DINOv2 choice: patch center over masked tokens, so the teacher head runs on CLS +
               masked tokens only.
  ibot_ckpt    ibot with activation checkpointing of the student blocks (memory for compute).
  ibot_full, ibot_masked_full
               ibot and ibot_masked with ``skip_unread_tokens=False``: every token through the last
               block (the before of the last-block skip, timed side by side).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(cfg, inp, args, patch_center="all", checkpointing=False, skip_unread_tokens=True):
    import peer_step  # the harness module (the plugin is loaded by it)
    import torch

    from ibot import iBOT
    from ibot.data.loader import Batch
    from ibot.data.masking import MaskBatch
    from ibot.train.schedules import StepValues
    from ibot.train.step import TrainStep

    torch.manual_seed(0)
    model = iBOT(
        "vit_small_patch16_224",
        projector_hidden_dim=cfg.hidden,
        projector_bottleneck_dim=cfg.bottleneck,
        n_cls_prototypes=cfg.K,
        n_patch_prototypes=cfg.K,
        image_size=cfg.global_size,
        encoder_kwargs={
            "embed_dim": cfg.embed_dim,
            "depth": cfg.depth,
            "num_heads": cfg.heads,
            "patch_size": cfg.patch,
        },
        drop_path_rate=cfg.drop_path,
        shared_head=True,
        norm_last_layer=False,
        patch_center=patch_center,
        temperature_teacher=0.07,
        skip_unread_tokens=skip_unread_tokens,
    )
    if checkpointing:
        model.student["backbone"].vit.set_grad_checkpointing(True)
    step = TrainStep(model, precision="fp32", device_type="cpu", clip_grad=cfg.clip, clip_mode="param")
    # epoch 1: the prototypes train (official freeze_last_layer=1 froze them in epoch 0 only)
    values = StepValues(1, 1, 5e-4 * cfg.batch / 256.0, 0.04, cfg.ema_momentum, *model.teacher_temperatures(1), False)
    masks = MaskBatch.from_masks(list(inp.masks))  # the collate's job in the real pipeline (not timed)
    batch = Batch(
        torch.cat(inp.globals_),
        torch.cat(inp.locals_) if inp.locals_ else None,
        masks,
        torch.zeros(cfg.batch, dtype=torch.long),
        cfg.n_global,
        len(inp.locals_),
    )
    model.train()

    def run() -> float:
        out = step(batch, values)
        return float(out.loss.detach())

    notes = {
        "source": "ibot (this repository): ibot.train.step.TrainStep, as `ibot pretrain` runs it",
        "vit": "timm VisionTransformer (fused SDPA attention) wrapped by ibot.models.MaskedViT",
        "head": "shared iBOTHead; student MLP once on [global CLS, local CLS, masked patch tokens]; teacher on "
        + (
            "CLS + every global patch token (official all-token patch center)"
            if patch_center == "all"
            else "CLS + masked patch tokens (DINOv2 masked-token center)"
        ),
        "loss": "vectorised CLS pair sum and masked-token patch CE (ibot.losses)",
        "clip": "per-parameter (official semantics) with torch._foreach_norm / _foreach_mul_, no host sync",
        "ema": "torch._foreach_mul_ / _foreach_add_",
        "activation_checkpointing": checkpointing,
        "last_block": "computes the tokens the losses read only (skip_unread_tokens)"
        if skip_unread_tokens
        else "every token (skip_unread_tokens=False)",
        "masks": "external block masks (same tensors as the peers); flat indices precomputed as in the collate",
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    return peer_step.Built(
        run,
        notes,
        sum(p.numel() for p in model.student.parameters()),
        sum(p.numel() for p in model.teacher.parameters()),
        True,
    )


def build_ibot(cfg, inp, args):
    return _build(cfg, inp, args)


def build_ibot_masked(cfg, inp, args):
    return _build(cfg, inp, args, patch_center="masked")


def build_ibot_ckpt(cfg, inp, args):
    return _build(cfg, inp, args, checkpointing=True)


def build_ibot_full(cfg, inp, args):
    return _build(cfg, inp, args, skip_unread_tokens=False)


def build_ibot_masked_full(cfg, inp, args):
    return _build(cfg, inp, args, patch_center="masked", skip_unread_tokens=False)


IMPLS = {
    "ibot": build_ibot,
    "ibot_masked": build_ibot_masked,
    "ibot_ckpt": build_ibot_ckpt,
    "ibot_full": build_ibot_full,
    "ibot_masked_full": build_ibot_masked_full,
}
