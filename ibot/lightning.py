"""Lightning integration: a ``LightningModule`` over the same method modules (no second copy of the math).

    import lightning
    from ibot.config import build_config
    from ibot.lightning import KNNCallback, iBOTLightningModule, make_dataloader
    cfg = build_config("smoke")
    trainer = lightning.Trainer(max_epochs=cfg.optim.epochs, callbacks=[KNNCallback.from_config(cfg)])
    trainer.fit(iBOTLightningModule(cfg), make_dataloader(cfg))

The module runs ``ibot.iBOT`` / ``ibot.DINO`` for the loss, ``ibot.train.optim`` for parameter
groups and per-parameter clipping, and the run's :class:`ibot.train.schedules.Schedules` (lr, weight
decay, momentum, teacher temperatures, last-layer freeze) indexed by the global step and sized from
the Lightning trainer (``estimated_stepping_batches``, so devices, ``limit_train_batches`` and
gradient accumulation are accounted for). The data's epoch (crops, masks) is the loader's
:class:`ibot.data.loader.EpochSampler`, moved by Lightning's own ``sampler.set_epoch`` every epoch
(also through its DDP sampler wrapper).
It logs the loss terms, the schedules and the collapse monitors. Requires ``pip install lightning``.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from ibot.builders.data import dataset_from_config, make_dataloader
from ibot.builders.model import build_model
from ibot.train.monitors import collapse_monitors
from ibot.train.optim import clip_gradients, drop_last_layer_grads, param_groups
from ibot.train.schedules import Schedules

__all__ = ["KNNCallback", "iBOTLightningModule", "make_dataloader"]

CONSTANT_MONITORS = ("teacher_entropy_max", "feature_dim")


class iBOTLightningModule(L.LightningModule):  # noqa: N801
    """iBOT / DINO pretraining as a LightningModule.

    Args:
        cfg: an ``ibot.config`` config (``build_config(preset, overrides)``); the schedules span
            ``cfg.optim.epochs`` epochs.
        steps_per_epoch: optimizer steps per epoch; by default taken from the Lightning trainer.
    """

    def __init__(self, cfg, steps_per_epoch: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        self.niter = steps_per_epoch
        self.automatic_optimization = True

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # loads the train loader when needed
        if trainer.max_steps == -1 and trainer.max_epochs and math.isfinite(total):
            return max(1, int(total) // trainer.max_epochs)
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("an infinite train loader has no epoch; pass steps_per_epoch= to iBOTLightningModule")
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def _schedules(self) -> None:
        if self.niter is None:
            self.niter = self._steps_per_epoch()
        self.schedules = Schedules.from_config(self.cfg, self.niter, self.trainer.world_size, self.model.teacher_temps)

    def on_fit_start(self) -> None:
        self._schedules()

    def configure_optimizers(self):
        return torch.optim.AdamW(param_groups(self.model.student), lr=0.0, betas=tuple(self.cfg.optim.betas))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)

    def _values(self):
        """This step's schedule values (the step of a new epoch counts from the epoch Lightning is in)."""
        return self.schedules[min(self.global_step, len(self.schedules) - 1)]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        v = self._values()
        for i, group in enumerate(self.optimizers().optimizer.param_groups):
            group["lr"] = v.lr
            if i == 0:
                group["weight_decay"] = v.weight_decay

    def training_step(self, batch, batch_idx):
        v = self._values()
        out = self.model(batch=batch, temps=v.teacher_temps)
        self.log("loss", out.loss.detach(), prog_bar=True)
        self.log("loss/cls", out.loss_cls)
        if out.loss_patch is not None:
            self.log("loss/patch", out.loss_patch)
        if out.loss_koleo is not None:
            self.log("loss/koleo", out.loss_koleo)
        self.log_dict(
            {
                "schedule/lr": v.lr,
                "schedule/weight_decay": v.weight_decay,
                "schedule/momentum": v.momentum,
                "schedule/teacher_temp": v.teacher_temp,
                "schedule/teacher_patch_temp": v.teacher_patch_temp,
            }
        )
        log_every = max(1, self.cfg.run.log_every)
        if self.global_step % log_every == 0 or batch_idx + 1 == self.trainer.num_training_batches:
            mon = collapse_monitors(self.model, out, v.teacher_temp)
            self.log_dict({f"monitor/{k}": float(v) for k, v in mon.items() if k not in CONSTANT_MONITORS})
        return out.loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        o = self.cfg.optim
        clip_gradients(self.model.trainable_parameters(), o.clip_grad, o.clip_mode)
        if self._values().freeze_last_layer:
            drop_last_layer_grads(self.model.student)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the teacher's EMA: once per optimizer step, not per micro-batch
        (``accumulate_grad_batches``). Inside this hook ``global_step`` is still this step's index."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.model.update_teacher(self.schedules[min(self.global_step, len(self.schedules) - 1)].momentum)


class KNNCallback(L.Callback):
    """k-NN accuracy of the teacher's CLS features every ``every_n_epochs`` epochs (and after the last).

    Logs ``knn/top1`` and ``knn/top5`` (k = ``k``, cosine votes weighted by ``exp(sim / T)``) and keeps
    the results in ``self.results``. Every rank extracts the same features and gets the same score.

    Args:
        bank, queries: labelled datasets of ``(PIL image, label)`` or in-memory datasets (``.images``).
        image_size, in_chans: evaluation size and channels of the backbone.
    """

    def __init__(
        self,
        bank,
        queries,
        image_size: int,
        in_chans: int = 3,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        num_workers: int = 0,
    ) -> None:
        self.bank, self.queries, self.image_size, self.in_chans = bank, queries, image_size, in_chans
        self.every_n_epochs, self.k, self.temperature, self.num_workers = every_n_epochs, k, temperature, num_workers
        self.results: list[dict] = []

    @classmethod
    def from_config(cls, cfg, every_n_epochs: int = 1) -> KNNCallback:
        """Bank = the training split, queries = the test split of ``cfg.data``."""
        return cls(
            dataset_from_config(cfg, train=True),
            dataset_from_config(cfg, train=False),
            cfg.model.img_size,
            cfg.model.in_chans,
            every_n_epochs=every_n_epochs,
            k=cfg.run.knn_k,
            temperature=cfg.run.knn_temperature,
            num_workers=cfg.data.num_workers,
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        from ibot.eval.knn import extract_features, knn_classify

        backbone = pl_module.model.teacher["backbone"]
        was_training = backbone.training
        backbone.eval()
        kw = dict(image_size=self.image_size, in_chans=self.in_chans, device=pl_module.device)
        kw["num_workers"] = self.num_workers
        with torch.no_grad():
            bank_f, bank_y = extract_features(backbone.forward_cls, self.bank, **kw)
            query_f, query_y = extract_features(backbone.forward_cls, self.queries, **kw)
        backbone.train(was_training)
        k = min(self.k, bank_f.shape[0])
        top1, top5 = knn_classify(bank_f, bank_y, query_f, query_y, ks=[k], temperature=self.temperature)[k]
        self.results.append({"epoch": epoch, "step": trainer.global_step, "k": k, "top1": top1, "top5": top5})
        pl_module.log_dict({"knn/top1": top1, "knn/top5": top5}, rank_zero_only=True)
