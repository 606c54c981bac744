"""Parallelism and compilation wiring of a training run, outside the model code and the loop.

:func:`parallelize` applies what a config asks of the model on its device: the efficient drop
path and gradient checkpointing of the student backbone, per-block compile
(``run.compile_mode=blocks``), FSDP2 sharding (``run.fsdp=true`` under torchrun,
:mod:`ibot.train.fsdp`) or DDP (with BatchNorm -> SyncBatchNorm on GPUs), and the whole-forward
compile (``run.compile_mode=full``, with its mask padding bound). The trainer builds the
optimizer step over what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ibot import distributed as D


@dataclass
class Parallel:
    """What :func:`parallelize` made of a model.

    Attributes:
        model: the iBOT / DINO module (sharded in place under FSDP).
        ddp: its DDP wrapper, or None (one process, or FSDP).
        module: what the step calls for the forward: the compiled forward (``run.compile_mode=full``),
            else None (the step then uses ``ddp`` or the model).
        pad_ratio: ``run.compile_mode=full`` with the patch loss: masked-token batches are padded to
            this mask ratio's bound (:func:`ibot.train.compiled.pad_mask_batch`); else None.
        fsdp: whether the model is FSDP2-sharded (checkpoints gather it).
    """

    model: torch.nn.Module
    ddp: torch.nn.Module | None = None
    module: object = None
    pad_ratio: float | None = None
    fsdp: bool = False

    @property
    def forward_module(self):
        """What the training step calls: compiled forward, else the DDP wrapper, else the model."""
        if self.module is not None:
            return self.module
        return self.ddp if self.ddp is not None else self.model


def parallelize(model: torch.nn.Module, cfg, device: torch.device, log=print) -> Parallel:
    """Apply ``cfg.run`` / ``cfg.model``'s compile, checkpointing, FSDP2 / DDP and SyncBN settings to
    ``model`` (already on ``device``), in the order the step needs them."""
    student_bb = model.student["backbone"]
    student_bb.efficient_drop_path = cfg.model.efficient_drop_path
    if cfg.run.grad_checkpointing:
        student_bb.timm_model.set_grad_checkpointing(True)
    if cfg.run.compile and cfg.run.compile_mode == "blocks":
        for bb in (student_bb, model.teacher["backbone"]):
            for blk in bb.blocks:
                blk.compile()
    par = Parallel(model, fsdp=cfg.run.fsdp and D.is_dist())
    if cfg.run.fsdp and not D.is_dist():
        log("run.fsdp=true needs torchrun with several processes; training unsharded")
    if par.fsdp:
        from ibot.train.fsdp import shard_model

        shard_model(model)
    elif D.is_dist():
        # BatchNorm (a bn head, a CNN backbone) -> SyncBatchNorm in student and teacher, as the official code;
        # torch's SyncBatchNorm runs on GPUs only: CPU processes each normalise with their own batch
        has_bn = any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in model.modules())
        if has_bn and device.type == "cpu":
            log("BatchNorm on CPU processes: statistics per process (SyncBatchNorm needs GPUs)")
        elif has_bn:
            model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
            model.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.teacher)
        # SyncBatchNorm keeps the BN running statistics identical on every rank, as the centers
        par.ddp = D.wrap_ddp(model, device)
    if cfg.run.compile and cfg.run.compile_mode == "full":
        from ibot.train.compiled import compile_forward

        # one graph for the whole forward; under DDP the wrapper is compiled (its graph splits
        # at the gradient buckets, so fullgraph is off there)
        par.module = compile_forward(model, module=par.ddp)
        par.pad_ratio = model.mask_generator.max_ratio if model.use_patch_loss else None
    return par


__all__ = ["Parallel", "parallelize"]
