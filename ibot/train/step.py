"""One optimisation step of iBOT / DINO: the code ``ibot pretrain`` and the benchmarks run.

zero grads -> forward (autocast) -> finite flag -> backward -> clipping -> last-layer freeze -> AdamW -> centers -> EMA,
with the step's values of :class:`ibot.train.schedules.Schedules` (lr, weight decay, temperatures,
freeze, momentum).

The step never waits for the device: whether the loss is finite is a device-side flag (all-reduced
over ranks) that the fused AdamW kernel, the center updates and the EMA read on the device, so a
non-finite step leaves parameters, optimizer state, centers and teacher exactly as they were. The
caller reads the flag after the step (:attr:`StepResult.finite`), when everything is queued.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ibot import distributed as D
from ibot.train.optim import clip_gradients, drop_last_layer_grads, param_groups


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite (the step was skipped)."""


@dataclass
class StepResult:
    """What :class:`TrainStep` returns.

    Attributes:
        out: the model output (``out.loss`` and its terms stay on the device).
        bad: 0-d device tensor, 1.0 when the loss was not finite on some rank (nothing was updated).
        flags: (2,) device tensor ``[bad, stop_vote]``, maximum over ranks (one all-reduce).
    """

    out: object
    bad: torch.Tensor
    flags: torch.Tensor

    def __getattr__(self, name):  # the output's fields read directly: ``result.loss``
        if name == "out":
            raise AttributeError(name)
        return getattr(self.out, name)


class TrainStep:
    """Owns the optimizer side of a step for an :class:`ibot.iBOT` module.

    Args:
        model: the iBOT / DINO module.
        module: what to call for the forward (the model, its DDP wrapper, or a compiled forward).
        precision: "fp32", "bf16" or "fp16" (fp16 uses a gradient scaler).
        device_type: "cpu" or "cuda" (autocast).
        clip_grad, clip_mode: gradient clipping ("param": official per-parameter; "global").
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
        betas=(0.9, 0.999),
    ) -> None:
        self.model, self.module = model, module or model
        self.precision, self.device_type = precision, device_type
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.params = model.trainable_parameters()
        # fused AdamW (CPU and CUDA) skips its update on the device when ``found_inf`` is set
        self.optimizer = torch.optim.AdamW(param_groups(model.student), lr=0.0, betas=tuple(betas), fused=True)
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

    def __call__(self, batch, values, stop_vote: bool = False) -> StepResult:
        """Forward, backward, update, centers, EMA, with no host synchronisation.

        ``values``: this step's :class:`ibot.train.schedules.StepValues` (lr, weight decay, teacher
        temperatures, last-layer freeze, EMA momentum).

        A non-finite loss (on any rank) skips every update on the device; read
        ``result.bad`` afterwards. ``stop_vote`` rides along the same all-reduce (e.g. a rank over
        its time limit), so a distributed run agrees on stopping without a second collective.
        """
        model = self.model
        self.set_hyperparameters(values.lr, values.weight_decay)
        # the previous step's gradients are freed before this forward, not kept alive through it
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():  # the centers move below, after the finite check
            out = self.module(batch=batch, temps=values.teacher_temps, update_centers=False)
        loss = out.loss
        bad_here = (~torch.isfinite(loss.detach())).float()
        flags = torch.stack([bad_here, bad_here.new_full((), 1.0 if stop_vote else 0.0)])
        D.all_reduce_max(flags)
        bad = flags[0]
        if self.scaler is not None:
            # a non-finite loss gives non-finite gradients: the scaler skips the step (and backs off)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip_gradients(self.params, self.clip_grad, self.clip_mode)
        if values.freeze_last_layer:
            drop_last_layer_grads(model.student)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = bad
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        good = bad == 0
        model.update_centers(out.targets, good)
        out.targets = None  # the (M, K_p) patch logits and targets must not live on through the next step
        model.update_teacher(values.momentum, good)
        return StepResult(out, bad, flags)
