"""Every per-step value of a run, built once and indexed by global step (DINOv2's ``train.py`` pattern).

The official code keeps its schedules in five places: per-iteration lr, weight decay and teacher
momentum arrays (``utils.cosine_scheduler``), per-epoch teacher temperatures inside the loss, and the
last-layer freeze inside the loop. Here :class:`Schedules` owns them all; the training step reads one
:class:`StepValues` per step and passes the temperatures to the model, so no model, loss or mask
generator holds an epoch. The trainer, the Lightning module and the plain-PyTorch example use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ibot.losses.teacher import TeacherTemperatures


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up ``linspace(start, base, warmup_epochs * niter)`` then cosine from base to final.

    Returns an array of ``epochs * niter_per_ep`` values, one per iteration (official ``cosine_scheduler``).
    """
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    span = max(len(iters), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / span))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@dataclass(frozen=True)
class StepValues:
    """The schedules' values at one global step.

    Attributes:
        step, epoch: the global step and its epoch.
        lr, weight_decay: AdamW's lr and the decayed group's weight decay.
        momentum: teacher EMA momentum applied after this step.
        teacher_temp, teacher_patch_temp: CLS and patch teacher temperatures.
        freeze_last_layer: True while the prototypes get no gradient (official ``freeze_last_layer``).
    """

    step: int
    epoch: int
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    teacher_patch_temp: float
    freeze_last_layer: bool

    @property
    def teacher_temps(self) -> tuple[float, float]:
        """(CLS, patch) teacher temperatures, as the model's ``forward(teacher_temps=...)`` takes them."""
        return self.teacher_temp, self.teacher_patch_temp


class Schedules:
    """Per-step lr, weight decay, teacher momentum, teacher temperatures and last-layer freeze.

    Args (the official recipe's; :meth:`from_config` fills them from a config):
        epochs, niter_per_epoch: length of every schedule (``epochs * niter_per_epoch`` steps).
        lr: peak lr, reached after ``warmup_epochs`` (linear warm-up from 0), then cosine to ``min_lr``.
        weight_decay, weight_decay_end: cosine weight decay.
        momentum_teacher: teacher momentum at step 0, cosine to 1.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: CLS teacher temperature, per epoch.
        warmup_teacher_patch_temp, teacher_patch_temp: patch teacher temperature, warmed up over the same
            epochs, starting at ``patch_start_epoch`` (official ``pred_start_epoch``).
        freeze_last_layer: epochs during which the prototypes get no gradient.
        teacher_temps: the run's :class:`ibot.losses.TeacherTemperatures` (the model's
            ``teacher_temps``, so a run holds its temperature parameters once); given, it replaces the
            six temperature arguments above.
    """

    def __init__(
        self,
        epochs: int,
        niter_per_epoch: int,
        *,
        lr: float,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        patch_start_epoch: int = 0,
        freeze_last_layer: int = 1,
        teacher_temps: TeacherTemperatures | None = None,
    ) -> None:
        if epochs < 1 or niter_per_epoch < 1:
            raise ValueError(f"schedules need at least one epoch and one step per epoch ({epochs} x {niter_per_epoch})")
        self.epochs, self.niter_per_epoch = int(epochs), int(niter_per_epoch)
        self.lr = cosine_scheduler(lr, min_lr, epochs, niter_per_epoch, warmup_epochs=warmup_epochs)
        self.weight_decay = cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_epoch)
        self.momentum = cosine_scheduler(momentum_teacher, 1.0, epochs, niter_per_epoch)
        self.teacher_temps = teacher_temps or TeacherTemperatures(
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_patch_temp,
            teacher_patch_temp,
            warmup_teacher_temp_epochs,
            int(patch_start_epoch),
        )
        self.freeze_last_layer = int(freeze_last_layer)

    @classmethod
    def from_config(
        cls, cfg, niter_per_epoch: int, world_size: int = 1, teacher_temps: TeacherTemperatures | None = None
    ) -> Schedules:
        """The schedules of a config: ``optim.lr`` is for a total batch of 256 (linear scaling rule);
        ``teacher_temps``: the run model's (else made from the config's ``loss.*`` temperatures)."""
        o, lo = cfg.optim, cfg.loss
        return cls(
            o.epochs,
            niter_per_epoch,
            lr=o.lr * (o.batch_size * world_size) / 256.0,
            min_lr=o.min_lr,
            warmup_epochs=o.warmup_epochs,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            momentum_teacher=o.momentum_teacher,
            warmup_teacher_temp=lo.warmup_teacher_temp,
            teacher_temp=lo.teacher_temp,
            warmup_teacher_patch_temp=lo.warmup_teacher_patch_temp,
            teacher_patch_temp=lo.teacher_patch_temp,
            warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs,
            patch_start_epoch=cfg.mask.start_epoch,
            freeze_last_layer=o.freeze_last_layer,
            teacher_temps=teacher_temps,
        )

    def __len__(self) -> int:
        return len(self.lr)

    def __getitem__(self, step: int) -> StepValues:
        """Values at global step ``step``; past the end, the last step's (a run may train a little longer)."""
        step = int(step)
        i = min(max(step, 0), len(self) - 1)
        epoch = step // self.niter_per_epoch
        teacher_temp, teacher_patch_temp = self.teacher_temps(epoch)
        return StepValues(
            step=step,
            epoch=epoch,
            lr=float(self.lr[i]),
            weight_decay=float(self.weight_decay[i]),
            momentum=float(self.momentum[i]),
            teacher_temp=teacher_temp,
            teacher_patch_temp=teacher_patch_temp,
            freeze_last_layer=epoch < self.freeze_last_layer,
        )

    def epoch_values(self, epoch: int) -> StepValues:
        """Values at the first step of ``epoch``."""
        return self[epoch * self.niter_per_epoch]
