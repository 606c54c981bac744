"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for large backbones, with world-size-free checkpoints.

With ``run.fsdp=true`` under ``torchrun`` every ViT block, each backbone and each head part (MLP,
prototypes) of the student *and* the teacher become FSDP2 units (a Swin backbone is one unit). Student and teacher
are sharded the same way, so the EMA update runs on local shards with the same ``_foreach`` ops as
without FSDP, and no rank ever holds a full copy of the weights outside a unit's forward.

Checkpoints stay the plain single-process format: :func:`full_model_state` gathers every sharded
tensor (a collective: all ranks call it) and :func:`full_optimizer_state` returns the AdamW state
in ``torch.optim`` index form, so an FSDP run resumes without FSDP, in any world size, and the other
way round (:func:`load_sharded_state`).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def shard_model(model: nn.Module) -> nn.Module:
    """Apply ``fully_shard`` to the blocks, backbones and heads of an iBOT/DINO module, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ibot import distributed as D

    device = "cuda" if torch.cuda.is_available() and next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device, (D.world_size(),))
    for branch in (model.student, model.teacher):
        backbone = branch["backbone"]
        if hasattr(backbone, "vit"):  # ViT blocks are called as modules: one unit each
            for blk in backbone.blocks:
                fully_shard(blk, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
        head = branch["head"]  # the step calls the head's parts (mlp, prototypes), not the head itself
        for part in (head.mlp, head.last_layer, head.last_layer2):
            if part is not None:
                fully_shard(part, mesh=mesh)
    model._ema_pairs = model._pair_parameters()  # fully_shard swaps in DTensor parameters
    return model


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: nn.Module) -> dict:
    """The model's state dict with every sharded tensor gathered (collective), on the CPU."""
    return {k: _full(v).detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state of sharded parameters as a plain ``optimizer.state_dict()`` (collective)."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: _full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load plain (full) model and optimizer state dicts into an FSDP2-sharded model and its optimizer."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard_like(ref, full):
        if isinstance(ref, DTensor):
            return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        return full

    from ibot.io import CheckpointError

    own = model.state_dict()
    missing = sorted(set(own) - set(model_sd))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, ref in own.items():
            value = shard_like(ref, model_sd[k])
            ref.copy_(value)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in optim_sd["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(p, v) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in s.items()}
    optimizer.load_state_dict({**optim_sd, "state": state})
