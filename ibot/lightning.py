"""Lightning integration: a ``LightningModule`` over the same method modules (no second copy of the math).

    from ibot.lightning import iBOTLightningModule, make_dataloader
    module = iBOTLightningModule(cfg)
    lightning.Trainer(max_epochs=cfg.optim.epochs).fit(module, make_dataloader(cfg))

The module runs ``ibot.iBOT`` / ``ibot.DINO`` for the loss, ``ibot.train.optim`` for parameter
groups, per-parameter clipping and last-layer freezing, and the official per-iteration lr, weight
decay and momentum schedules. Requires ``pip install lightning``.
"""

from __future__ import annotations

import lightning as L
import torch

from ibot.config import build_model
from ibot.data.factory import collate_from_config, dataset_from_config, pil_transform_from_config
from ibot.data.loader import MultiCropDataset
from ibot.train.optim import cancel_last_layer_grads, clip_gradients, param_groups
from ibot.train.schedules import cosine_scheduler


def make_dataloader(cfg, num_workers: int | None = None) -> torch.utils.data.DataLoader:
    """A standard DataLoader of multi-crop batches with collate-side masks (Lightning adds its sampler)."""
    ds = MultiCropDataset(dataset_from_config(cfg), pil_transform_from_config(cfg), seed=cfg.run.seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_from_config(cfg),
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
    )


class iBOTLightningModule(L.LightningModule):  # noqa: N801
    """iBOT / DINO pretraining as a LightningModule.

    Args:
        cfg: an ``ibot.config`` config (``build_config(preset, overrides)``).
        steps_per_epoch: optimizer steps per epoch (for the per-iteration schedules).
    """

    def __init__(self, cfg, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        self.niter = steps_per_epoch
        self.automatic_optimization = True

    def _schedules(self):
        o = self.cfg.optim
        world = self.trainer.world_size if self._trainer is not None else 1
        total_batch = o.batch_size * world
        self.lr_schedule = cosine_scheduler(
            o.lr * total_batch / 256.0, o.min_lr, o.epochs, self.niter, warmup_epochs=o.warmup_epochs
        )
        self.wd_schedule = cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, self.niter)
        self.momentum_schedule = cosine_scheduler(o.momentum_teacher, 1.0, o.epochs, self.niter)

    def on_fit_start(self) -> None:
        self._schedules()

    def configure_optimizers(self):
        return torch.optim.AdamW(param_groups(self.model.student), lr=0.0, betas=tuple(self.cfg.optim.betas))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)

    def _it(self) -> int:
        return min(self.global_step, len(self.lr_schedule) - 1)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        it = self._it()
        for i, group in enumerate(self.optimizers().optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:
                group["weight_decay"] = float(self.wd_schedule[it])

    def training_step(self, batch, batch_idx):
        out = self.model(batch=batch, epoch=self.current_epoch)
        self.log("loss", out.loss.detach(), prog_bar=True)
        self.log("loss_cls", out.loss_cls)
        if out.loss_patch is not None:
            self.log("loss_patch", out.loss_patch)
        return out.loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        o = self.cfg.optim
        clip_gradients(self.model.trainable_parameters(), o.clip_grad, o.clip_mode)
        cancel_last_layer_grads(self.model.student, self.current_epoch, o.freeze_last_layer)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.update_teacher(float(self.momentum_schedule[self._it() - 1 if self.global_step else 0]))

    def on_train_epoch_start(self) -> None:
        self.model.set_epoch(self.current_epoch)
        loader = self.trainer.train_dataloader
        if loader is not None and hasattr(loader, "collate_fn") and hasattr(loader.collate_fn, "epoch"):
            loader.collate_fn.epoch = self.current_epoch
            if loader.collate_fn.mask_generator is not None:
                loader.collate_fn.mask_generator.set_epoch(self.current_epoch)
