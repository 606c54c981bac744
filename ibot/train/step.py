"""One optimisation step of iBOT / DINO: the code ``ibot pretrain`` and the benchmarks run.

forward (autocast) -> finite check -> backward -> clipping -> last-layer freeze -> AdamW -> EMA.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ibot.train.optim import cancel_last_layer_grads, clip_gradients, param_groups


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite (the step was skipped)."""


class TrainStep:
    """Owns the optimizer side of a step for an :class:`ibot.iBOT` module.

    Args:
        model: the iBOT / DINO module.
        module: what to call for the forward (the model, or its DDP wrapper).
        precision: "fp32", "bf16" or "fp16" (fp16 uses a gradient scaler).
        device_type: "cpu" or "cuda" (autocast).
        clip_grad, clip_mode: gradient clipping ("param": official per-parameter; "global").
        freeze_last_layer: epochs during which ``*last_layer*`` gradients are dropped.
        betas: AdamW betas.
    """

    def __init__(
        self,
        model,
        module=None,
        *,
        precision: str = "fp32",
        device_type: str = "cpu",
        clip_grad: float = 3.0,
        clip_mode: str = "param",
        freeze_last_layer: int = 1,
        betas=(0.9, 0.999),
    ) -> None:
        self.model, self.module = model, module or model
        self.precision, self.device_type = precision, device_type
        self.clip_grad, self.clip_mode, self.freeze_last_layer = clip_grad, clip_mode, freeze_last_layer
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            param_groups(model.student), lr=0.0, betas=tuple(betas), fused=device_type == "cuda"
        )
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def set_hyperparameters(self, lr: float, weight_decay: float) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the decayed group follows the weight-decay schedule
                group["weight_decay"] = weight_decay

    def __call__(self, batch, epoch: int, momentum: float):
        """Forward, backward, update, EMA. Returns the model output; raises NonFiniteLossError (nothing updated)."""
        with self.autocast():
            out = self.module(batch=batch, epoch=epoch)
        if not math.isfinite(float(out.loss.detach())):
            raise NonFiniteLossError(f"loss is {float(out.loss.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            out.loss.backward()
        clip_gradients(self.params, self.clip_grad, self.clip_mode)
        cancel_last_layer_grads(self.model.student, epoch, self.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.update_teacher(momentum)
        return out
