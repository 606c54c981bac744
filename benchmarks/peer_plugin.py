"""``ibot`` plugin for the peer step harness (``../shared/bench/peer_step.py``).

Runs ``ibot``'s real training step (:class:`ibot.train.step.TrainStep`, the code ``ibot pretrain``
runs) on the harness's configs, inputs and block masks:

    python ../shared/bench/peer_step.py --plugin benchmarks/peer_plugin.py \\
        --impls official,lightly,ibot,ibot_masked --configs S,S0,T

Implementations (the harness's drop path 0.1 as timm's per-sample DropPath unless "edp"):
  ibot         faithful default: official all-token patch center (the teacher head runs on every
               global patch token, no grad), student head on CLS + masked tokens only; the last
               block computes only the tokens the losses read (``skip_unread_tokens``).
  ibot_edp     ibot with ``model.efficient_drop_path`` (residual branches on the kept samples only):
               the vit_small_in1k preset's default.
  ibot_full    ibot with every token through the last block (``skip_unread_tokens=False``): the
               step before issue 27.
  ibot_masked  DINOv2 choice: patch center over masked tokens, so the teacher head runs on CLS +
               masked tokens only (last-block skip in student and teacher).
  ibot_masked_edp, ibot_masked_full
               ibot_masked with the efficient drop path / with every token through the last block.
  ibot_ckpt    ibot with activation checkpointing of the student blocks (memory for compute).
  ibot_cblocks ibot_edp with ``run.compile=true`` (each block through torch.compile, inductor); the
               first step, compile included, is timed in the plugin (``compile_first_step_s``).
  ibot_cfull   ibot_edp with ``run.compile_mode=full`` (the whole forward as one fullgraph, masks padded).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(
    cfg, inp, args, patch_center="all", checkpointing=False, efficient=False, compile_mode=None, skip_unread_tokens=True
):
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
    model.student["backbone"].efficient_drop_path = efficient
    module = None
    if compile_mode == "blocks":  # what ibot.train.parallelize does for run.compile=true
        for bb in (model.student["backbone"], model.teacher["backbone"]):
            for blk in bb.blocks:
                blk.compile()
    elif compile_mode == "full":
        from ibot.train.compiled import compile_forward

        module = compile_forward(model)
    step = TrainStep(model, module=module, precision="fp32", device_type="cpu", clip_grad=cfg.clip, clip_mode="param")
    # epoch 1: the prototypes train (official freeze_last_layer=1 froze them in epoch 0 only)
    values = StepValues(1, 1, 5e-4 * cfg.batch / 256.0, 0.04, cfg.ema_momentum, *model.teacher_temperatures(1), False)
    masks = MaskBatch.from_masks(list(inp.masks))  # the collate's job in the real pipeline (not timed)
    if compile_mode == "full":
        from ibot.train.compiled import pad_mask_batch

        masks = pad_mask_batch(masks, 0.5)  # the harness's block masks: ratio at most 0.5
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

    first_step_s = None
    if compile_mode is not None:  # compile happens in the first call: timed here, apart from the steps
        import time

        t0 = time.perf_counter()
        run()
        first_step_s = round(time.perf_counter() - t0, 2)

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
        "efficient_drop_path": efficient,
        "compile": compile_mode,
        "compile_first_step_s": first_step_s,
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


def build_ibot_edp(cfg, inp, args):
    return _build(cfg, inp, args, efficient=True)


def build_ibot_full(cfg, inp, args):
    return _build(cfg, inp, args, skip_unread_tokens=False)


def build_ibot_masked_edp(cfg, inp, args):
    return _build(cfg, inp, args, patch_center="masked", efficient=True)


def build_ibot_masked_full(cfg, inp, args):
    return _build(cfg, inp, args, patch_center="masked", skip_unread_tokens=False)


def build_ibot_cblocks(cfg, inp, args):
    return _build(cfg, inp, args, efficient=True, compile_mode="blocks")


def build_ibot_cfull(cfg, inp, args):
    return _build(cfg, inp, args, efficient=True, compile_mode="full")


IMPLS = {
    "ibot": build_ibot,
    "ibot_masked": build_ibot_masked,
    "ibot_ckpt": build_ibot_ckpt,
    "ibot_edp": build_ibot_edp,
    "ibot_full": build_ibot_full,
    "ibot_masked_edp": build_ibot_masked_edp,
    "ibot_masked_full": build_ibot_masked_full,
    "ibot_cblocks": build_ibot_cblocks,
    "ibot_cfull": build_ibot_cfull,
}
