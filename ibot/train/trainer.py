"""The pretraining loop: orchestration only (data, schedules, optimizer, checkpoints, logs, k-NN).

The math lives in :mod:`ibot.methods` and :mod:`ibot.losses`. One process on CPU or GPU, or many
under ``torchrun`` (DDP); no global state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ibot import distributed as D
from ibot.builders.data import (
    batch_augment_from_config,
    collate_from_config,
    crop_flip_dataset_from_config,
    dataset_from_config,
    device_augment_from_config,
    pil_transform_from_config,
    resolve_pipeline,
)
from ibot.builders.model import build_model
from ibot.builders.sources import CHECKPOINT, resolve_source
from ibot.config import ConfigError, flatten, from_dict, to_dict
from ibot.data.datasets import DatasetError, slice_dataset, spread_subset, validation_split
from ibot.data.loader import Batch, EpochSampler, MultiCropDataset, TensorBatches, mix_seed
from ibot.data.prefetch import DeviceBatches, batch_bytes, prefetch_factor
from ibot.eval.knn import extract_features, knn_classify
from ibot.io import CheckpointError, load_safe, previous_path, remove_stale_temporaries, save_atomic
from ibot.train import runlock
from ibot.train.loggers import build_loggers
from ibot.train.metrics import MetricsWriter, collapse_monitors, plot_curves
from ibot.train.schedules import Schedules
from ibot.train.signals import SignalStopError, StopSignals, ignore_stop_signals
from ibot.train.step import TrainStep

# keys whose change makes a checkpoint incompatible (shapes / the method itself)
STRUCTURAL_KEYS = (
    "method",
    "model.arch",
    "model.patch_size",
    "model.img_size",
    "model.in_chans",
    "model.embed_dim",
    "model.depth",
    "model.num_heads",
    "model.window_size",
    "model.depths",
    "model.stage_heads",
    "model.out_dim",
    "model.patch_out_dim",
    "model.shared_head",
    "model.hidden_dim",
    "model.bottleneck_dim",
    "model.head_layers",
    "model.head_norm",
    "mask.enabled",  # the student's mask token
    "model.norm_last_layer",  # decides which head weights the optimizer holds
)
# keys a checkpoint must hold for ``pretrain --resume``
REQUIRED_KEYS = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "config", "rng")
SYNC_EVERY = 10  # under torchrun, ranks agree on stop / save decisions every this many steps

NAN_ADVICE = (
    "the loss was not finite for {n} consecutive steps; the last good checkpoint is kept. Try: a lower optim.lr, "
    "a longer optim.warmup_epochs, run.precision=fp32, a lower AdamW beta2 (optim.betas=[0.9,0.99]), "
    "or a higher optim.momentum_teacher."
)


# keys of the per-step lr / weight decay / momentum schedules: changing one on resume moves them
SCHEDULE_KEYS = (
    "optim.epochs",
    "optim.batch_size",
    "optim.lr",
    "optim.min_lr",
    "optim.warmup_epochs",
    "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.momentum_teacher",
)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to try."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda but no CUDA device is available; use run.device=cpu")
    return torch.device(name)


class Trainer:
    """Pretrains the model a :class:`ibot.config.Config` describes.

    Args:
        cfg: resolved config (``ibot.config.build_config``).
        log: callable for human-readable lines (rank 0 only).
        resume: "auto" (resume when the run folder has a checkpoint), "never", or a checkpoint path.
    """

    def __init__(self, cfg, log=print, resume: str = "auto") -> None:
        self.cfg = cfg
        self._init_distributed()
        self.log = log if D.is_main() else (lambda *a, **k: None)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = resolve_device(cfg.run.device)
        if self.device.type == "cuda" and D.is_dist():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.precision = cfg.run.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed + D.rank())
        random.seed(cfg.run.seed + D.rank())

        self._build_data()
        try:
            self.model = build_model(cfg)
        except ValueError as err:  # the model settings do not fit the backbone: a config problem
            raise ConfigError(f"{err}; check the model.* and method keys") from err
        if cfg.run.init_from:
            from ibot.builders.sources import init_model_from

            self.log(init_model_from(self.model, cfg.run.init_from))
        self.model = self.model.to(self.device)
        student_bb = self.model.student["backbone"]
        student_bb.efficient_drop_path = cfg.model.efficient_drop_path
        if cfg.run.grad_checkpointing:
            student_bb.timm_model.set_grad_checkpointing(True)
        self.pad_ratio = None  # run.compile_mode=full: masked-token batches padded to a fixed bound
        if cfg.run.compile and cfg.run.compile_mode == "blocks":
            for bb in (student_bb, self.model.teacher["backbone"]):
                for blk in bb.blocks:
                    blk.compile()
        self.ddp = None
        self.fsdp = cfg.run.fsdp and D.is_dist()
        if cfg.run.fsdp and not D.is_dist():
            self.log("run.fsdp=true needs torchrun with several processes; training unsharded")
        if self.fsdp:
            from ibot.fsdp import shard_model

            shard_model(self.model)
        elif D.is_dist():
            # BatchNorm (a bn head, a CNN backbone) -> SyncBatchNorm in student and teacher, as the official code;
            # torch's SyncBatchNorm runs on GPUs only: CPU processes each normalise with their own batch
            has_bn = any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in self.model.modules())
            if has_bn and self.device.type == "cpu":
                self.log("BatchNorm on CPU processes: statistics per process (SyncBatchNorm needs GPUs)")
            elif has_bn:
                self.model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.student)
                self.model.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.teacher)
            # SyncBatchNorm keeps the BN running statistics identical on every rank, as the centers
            self.ddp = D.wrap_ddp(self.model, self.device)
        o = cfg.optim
        self.step_fn = TrainStep(
            self.model,
            self.ddp,
            precision=self.precision,
            device_type=self.device.type,
            clip_grad=o.clip_grad,
            clip_mode=o.clip_mode,
            betas=tuple(o.betas),
        )
        if cfg.run.compile and cfg.run.compile_mode == "full":
            from ibot.train.compiled import compile_forward

            # one graph for the whole forward; under DDP the wrapper is compiled (its graph splits
            # at the gradient buckets, so fullgraph is off there)
            self.step_fn.module = compile_forward(self.model, module=self.ddp)
            self.pad_ratio = self.model.mask_generator.max_ratio if self.model.use_patch_loss else None
        self.optimizer, self.scaler = self.step_fn.optimizer, self.step_fn.scaler
        self.schedules = Schedules.from_config(cfg, self.niter, D.world_size())
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.bad_steps, self.skipped_images, self.seen_images, self.attempted_images = 0, 0, 0, 0
        self._lock = None
        if D.is_main():
            try:
                self._lock = runlock.acquire(self.run_dir, log=self.log)
                weakref.finalize(self, self._lock.release)
                _check_writable(self.run_dir)
            except OSError as err:
                raise TrainingError(
                    f"run folder {self.run_dir} is not writable ({err.strerror or err}); choose another run.output_dir"
                ) from err
            remove_stale_temporaries(self.run_dir)
        if resume != "never":
            ckpt = self.run_dir / CHECKPOINT if resume == "auto" else resolve_source(resume, checkpoint_only=True)
            if ckpt.is_file() or previous_path(ckpt).is_file():
                self.load_checkpoint_or_previous(ckpt)
            elif resume != "auto":
                raise CheckpointError(f"no checkpoint at {ckpt}; start a new run without --resume")
        if D.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        self.metrics = None
        if D.is_main():  # lines after the step training starts from are dropped (resume, --fresh)
            loggers = build_loggers(cfg.run.loggers, self.run_dir, to_dict(cfg), self.global_step)
            self.metrics = MetricsWriter(self.run_dir, loggers, start_step=self.global_step)

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        if D.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not D.is_dist():
            if torch.cuda.is_available() and self.cfg.run.device != "cpu":
                # binding the process group to this rank's GPU lets NCCL connect eagerly and
                # never guess the device
                local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(local)
                dist.init_process_group("nccl", device_id=local)
            else:
                dist.init_process_group("gloo")

    def _build_data(self) -> None:
        cfg, d, m = self.cfg, self.cfg.data, self.cfg.model
        self.train_set = dataset_from_config(cfg, train=True)
        self.bank_set = self.train_set  # the k-NN memory bank is the whole training split
        if d.limit:
            self.train_set = slice_dataset(self.train_set, 0, d.limit)
        n, b, w = len(self.train_set), cfg.optim.batch_size, D.world_size()
        if n < b * w:
            raise DatasetError(
                f"the dataset has {n} images, fewer than one batch ({b} x {w} processes); "
                "lower optim.batch_size or add images"
            )
        self.niter = n // (b * w)
        self.pipeline = resolve_pipeline(d.pipeline, hasattr(self.train_set, "images"), self.device.type)
        self.use_tensor = self.pipeline == "tensor"
        if self.use_tensor and not hasattr(self.train_set, "images"):
            raise DatasetError("data.pipeline=tensor needs an in-memory dataset; use data.pipeline=pil for folders")
        if self.use_tensor and self.train_set.images.shape[1] != m.in_chans:
            ch = self.train_set.images.shape[1]
            raise DatasetError(f"the dataset has {ch} channel(s) but model.in_chans={m.in_chans}")
        self.collate = collate_from_config(cfg)
        self.device_augment, self.loader = None, None
        if self.use_tensor:
            self.augment = batch_augment_from_config(cfg)
        elif self.pipeline == "gpu":
            self.mc_dataset = crop_flip_dataset_from_config(cfg, self.train_set)
            self.device_augment = device_augment_from_config(cfg)
        else:
            self.mc_dataset = MultiCropDataset(self.train_set, pil_transform_from_config(cfg), seed=cfg.run.seed)

    def batches(self, epoch: int, start_step: int = 0):
        """This rank's batches of ``epoch`` from ``start_step`` on (deterministic), on the training device."""
        seed, rank = self.cfg.run.seed, D.rank()
        if self.use_tensor:
            sampler = EpochSampler(
                len(self.train_set), self.cfg.optim.batch_size, seed, epoch, rank, D.world_size(), start_step
            )
            loader = TensorBatches(self.train_set.images, self.train_set.labels, sampler, self.augment, self.collate)
        else:
            loader = self._dataloader(epoch, start_step)
        return DeviceBatches(
            loader, self.device, self.device_augment, lambda step: mix_seed(seed, epoch, rank, step, 104729), start_step
        )

    def _dataloader(self, epoch: int, start_step: int):
        """One DataLoader for the whole run (persistent workers); the epoch travels with the indices."""
        if self.loader is None:
            d, m, b = self.cfg.data, self.cfg.model, self.cfg.optim.batch_size
            crops = [(d.global_crops_number, m.img_size), (d.local_crops_number, d.local_crop_size)]
            size = batch_bytes(b, m.in_chans, crops, 1 if self.pipeline == "gpu" else 4)
            seed, rank, world = self.cfg.run.seed, D.rank(), D.world_size()
            sampler = EpochSampler(len(self.train_set), b, seed, epoch, rank, world, with_epoch=True)
            self.loader = torch.utils.data.DataLoader(
                self.mc_dataset,
                batch_size=b,
                sampler=sampler,
                num_workers=d.num_workers,
                collate_fn=self.collate,
                pin_memory=self.device.type == "cuda",
                drop_last=True,
                persistent_workers=d.num_workers > 0,
                prefetch_factor=prefetch_factor(d.num_workers, size),
                # its own generator: iter() draws worker base seeds from it, not from the global RNG
                # that drop path uses (a resumed run would otherwise draw different drop-path masks)
                generator=torch.Generator().manual_seed(self.cfg.run.seed),
                worker_init_fn=ignore_stop_signals if d.num_workers else None,  # the main process saves
            )
        self.loader.sampler.epoch, self.loader.sampler.start_batch = epoch, start_step
        return self.loader

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return self.step_fn.autocast()

    def train_step(self, batch: Batch, it: int, stop_vote: bool = False):
        """One optimisation step at global step ``it``. Returns the model output, or None when skipped.

        The step itself never waits for the device; its flags (non-finite loss, a rank's stop vote)
        are read once here, after the whole step is queued.
        """
        if self.pad_ratio is not None and batch.masks is not None:
            from ibot.train.compiled import pad_mask_batch

            batch.masks = pad_mask_batch(batch.masks, self.pad_ratio)  # host-side, before the copy
        res = self.step_fn(batch.to(self.device), self.schedules[it], stop_vote=stop_vote)
        bad, stop = res.flags.tolist()
        self.stop_voted = stop > 0
        if bad:
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.run.max_bad_steps:
                raise TrainingError(NAN_ADVICE.format(n=self.bad_steps))
            self.log(f"warning: non-finite loss at step {it}; step skipped ({self.bad_steps} in a row)")
            return None
        self.bad_steps = 0
        return res.out

    def _monitors(self, out, teacher_temp: float) -> dict:
        """Collapse monitors from the teacher's CLS logits of this step."""
        return collapse_monitors(self.model, out, teacher_temp)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg = self.cfg
        total = cfg.optim.epochs * self.niter
        max_steps = cfg.run.max_steps or total
        self.log(
            f"ibot: {cfg.method} on {cfg.data.dataset} ({len(self.train_set)} images), {cfg.model.arch} "
            f"-> {self.run_dir} | {self.niter} steps/epoch x {cfg.optim.epochs} epochs, batch "
            f"{cfg.optim.batch_size}x{D.world_size()}, {self.device} {self.precision}, data.pipeline={self.pipeline}"
        )
        if cfg.data.dataset in ("imagefolder", "folder") and getattr(self.train_set, "split", None):
            self.log(f"data: training on {self.train_set.split}")
        if self.global_step:
            self.log(f"resumed at epoch {self.epoch}, step {self.global_step}")
        try:
            with StopSignals() as signals:
                result = self._train(signals, max_steps)
            if signals.signum:
                where = self.run_dir / CHECKPOINT
                raise SignalStopError(
                    f"stopped by {signals.name} at step {self.global_step} (epoch {self.epoch}); checkpoint "
                    f"saved to {where}; continue with `ibot pretrain --resume {self.run_dir}`",
                    signals.signum,
                )
            if cfg.run.knn_at_end:
                result["knn"] = self.evaluate_knn()
            result.update(self._summary(self._step0, self._images0))
            if D.is_main():
                plot_curves(self.run_dir)
                (self.run_dir / "summary.json").write_text(json.dumps(result, indent=2))
                self._log_summary(result)
        finally:
            if self.metrics:
                self.metrics.close()
            if self._lock:
                self._lock.release()
        return result

    def _stop_flags(self, signals: StopSignals) -> tuple[int, bool]:
        """(signal number or 0, time-based save due), the same on every rank.

        One process reads a Python flag and the clock. Under torchrun the ranks all-reduce them every
        ``SYNC_EVERY`` steps only, so every rank stops and saves at the same step. (The time limit
        rides on the step's own flags, see :meth:`train_step`.)
        """
        every = self.cfg.run.save_every_minutes
        flags = [signals.signum or 0, bool(every) and time.time() - self._last_save > 60 * every]
        if D.is_dist():
            if self.global_step % SYNC_EVERY:
                return 0, False
            t = D.all_reduce_max(torch.tensor([float(f) for f in flags], device=self.device))
            flags = [int(v) for v in t.tolist()]
        return int(flags[0]), bool(flags[1])

    def _train(self, signals: StopSignals, max_steps: int) -> dict:
        cfg = self.cfg
        total = cfg.optim.epochs * self.niter
        result = {}
        stopped = False
        t_start = time.time()
        self.last_record, self._last_print = None, 0.0
        self._step0, self._images0 = self.global_step, self.seen_images
        self.train_seconds = 0.0  # excludes evaluation
        self._warned_epoch = -1
        self._last_save = time.time()
        while self.epoch < cfg.optim.epochs and not stopped:
            epoch = self.epoch
            self.model.train()
            batches = self.batches(epoch, self.step_in_epoch)
            bar = self._progress(epoch)
            t_last, n_last = time.time(), 0
            t_epoch = time.time()
            for batch in batches:
                it = epoch * self.niter + self.step_in_epoch
                self.skipped_images += batch.n_skipped
                self.attempted_images += batch.batch_size + batch.n_skipped
                self._check_skips()
                limit = cfg.run.time_limit_min
                over = bool(limit) and self.train_seconds + time.time() - t_epoch > 60 * limit
                if batch.batch_size:
                    res = self.train_step(batch, it, stop_vote=over and D.is_dist())
                else:  # every image of the batch was unreadable: counted above, no step
                    res = None
                self.step_in_epoch += 1
                self.global_step += 1
                if bar is not None:
                    bar.update(1)
                n_last += batch.batch_size * batch.n_global
                self.seen_images += batch.batch_size * D.world_size()
                last = self.step_in_epoch == self.niter or self.global_step >= max_steps
                if res is not None and (self.global_step % cfg.run.log_every == 0 or last):
                    rec = self._record(res, epoch, it, n_last / max(time.time() - t_last, 1e-9) / batch.n_global)
                    t_last, n_last = time.time(), 0
                    self.last_record = rec
                    if self.metrics:
                        self.metrics.write(rec)
                    if bar is None:  # no progress bar: a text line now and then
                        self._text_progress(rec, total, last)
                    else:
                        bar.set_postfix(
                            loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", ips=f"{rec['images_per_s']:.0f}"
                        )
                    warn = self._collapse_warning(rec)
                    if warn and self._warned_epoch != epoch:  # at most once per epoch
                        self._warned_epoch = epoch
                        self.log(f"epoch {epoch}, step {self.global_step}: {warn}")
                signalled, save_by_time = self._stop_flags(signals)
                save_due = cfg.run.save_every_steps and self.global_step % cfg.run.save_every_steps == 0
                if (save_due or save_by_time) and self.bad_steps == 0:  # never inside a streak of NaN losses
                    self.save_checkpoint()
                if self.global_step >= max_steps:
                    stopped = True
                if limit:
                    # one process: the clock after this step; several: any rank's vote taken before
                    # the step, all-reduced with the step's own flags (rank clocks differ; no extra sync)
                    over = self.stop_voted if D.is_dist() else self.train_seconds + time.time() - t_epoch > 60 * limit
                    if over:
                        self.log(f"time limit of {cfg.run.time_limit_min} min reached at step {self.global_step}")
                        stopped = True
                if signalled:
                    signals.signum = signalled  # under torchrun: the signal of any rank
                    self.log(f"{signals.name} received: saving a checkpoint at step {self.global_step} and stopping")
                    stopped = True
                if stopped:
                    break
            if bar is not None:
                bar.close()
            self.train_seconds += time.time() - t_epoch
            if self.step_in_epoch >= self.niter:
                self.epoch += 1
                self.step_in_epoch = 0
                if self.bad_steps == 0:
                    self.save_checkpoint()
                if cfg.run.saveckp_freq and epoch % cfg.run.saveckp_freq == 0 and epoch > 0 and D.is_main():
                    shutil.copyfile(self.run_dir / CHECKPOINT, self.run_dir / f"checkpoint{epoch:04d}.pth")
                if cfg.run.knn_every and self.epoch % cfg.run.knn_every == 0 and self.epoch < cfg.optim.epochs:
                    result["knn"] = self.evaluate_knn()
            elif stopped:
                self.save_checkpoint()
        result["train_minutes"] = self.train_seconds / 60
        result["wall_minutes"] = (time.time() - t_start) / 60
        return result

    def _text_progress(self, rec: dict, total: int, last: bool) -> None:
        """One line every run.print_every_s seconds and at the end of each epoch (when the bar is off)."""
        now = time.time()
        if not last and now - self._last_print < self.cfg.run.print_every_s:
            return
        self._last_print = now
        self.log(
            f"epoch {rec['epoch'] + 1}/{self.cfg.optim.epochs} step {rec['step']}/{total} "
            f"({self.step_in_epoch}/{self.niter} in epoch): loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
            f"{rec['images_per_s']:.0f} img/s"
        )

    def _summary(self, step0: int, images0: int) -> dict:
        """What this invocation did, for summary.json and the final lines."""
        rec = self.last_record or {}
        images = self.seen_images - images0
        out = {
            "steps": self.global_step - step0,
            "final_step": self.global_step,
            "final_epoch": self.epoch,
            "images_per_s": images / max(self.train_seconds, 1e-9),
        }
        if rec:
            out["final_loss"] = rec["loss"]
            out["final_losses"] = {k: rec[k] for k in ("loss_cls", "loss_patch", "loss_koleo") if k in rec}
        return out

    def _log_summary(self, result: dict) -> None:
        loss = f"final loss {result['final_loss']:.4f} (step {result['final_step']})" if "final_loss" in result else ""
        self.log(
            f"done: {result['steps']} steps in {result['wall_minutes']:.1f} min ({result['train_minutes']:.1f} min "
            f"training, {result['images_per_s']:.0f} img/s); {loss or 'no step trained'}"
        )
        knn = result.get("knn")
        if knn:
            split = knn.get("split", f"the {self.cfg.run.knn_split} split ({knn['n_test']} images)")
            self.log(
                f"k-NN top-1 {knn['top1']:.2f}% top-5 {knn['top5']:.2f}% (k={knn['k']}, queries: {split}; "
                f"{knn['n_train']} bank images)"
            )
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in self.run_dir.iterdir() if p.name[0] != ".")
        self.log(f"files in {self.run_dir}: {', '.join(names)}")

    def _progress(self, epoch: int):
        """The epoch's progress bar (updated by hand, so a run that stops at its last step shows n/n), or None."""
        if not (self.cfg.run.progress and D.is_main()):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.niter,
            initial=self.step_in_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def _record(self, out, epoch: int, it: int, ips: float) -> dict:
        rec = {
            "step": self.global_step,
            "epoch": epoch,
            "loss": float(out.loss.detach()),
            "loss_cls": float(out.loss_cls),
        }
        if out.loss_patch is not None:
            rec["loss_patch"] = float(out.loss_patch)
        if out.loss_koleo is not None:
            rec["loss_koleo"] = float(out.loss_koleo)
        v = self.schedules[it]
        rec.update(
            lr=v.lr,
            wd=v.weight_decay,
            momentum=v.momentum,
            teacher_temp=v.teacher_temp,
            teacher_patch_temp=v.teacher_patch_temp,
            images_per_s=ips,
            skipped_images=self.skipped_images,
            time=time.time(),
        )
        rec.update(self._monitors(out, v.teacher_temp))
        return rec

    def _collapse_warning(self, rec: dict) -> str | None:
        if rec["epoch"] < 1:
            return None
        if rec["teacher_entropy"] > 0.97 * rec["teacher_entropy_max"]:
            return (
                "warning: teacher outputs are nearly uniform (collapse to uniform): try a lower "
                "loss.teacher_temp or less centering (loss.center_momentum closer to 1)"
            )
        if rec["feature_rank"] < 0.1 * rec["feature_dim"]:
            return (
                f"warning: the teacher's CLS features span few directions (RankMe {rec['feature_rank']:.1f} of "
                f"{rec['feature_dim']}; dimensional collapse, k-NN suffers): try loss.koleo_weight=0.1"
            )
        if rec["prototypes_used"] <= 1:
            return (
                "warning: teacher outputs are one-hot on few prototypes (collapse to one prototype): try a higher "
                "loss.teacher_temp, loss.centering=sinkhorn, or a longer optim.warmup_epochs"
            )
        return None

    def _check_skips(self) -> None:
        """Stop when this rank skipped more than ``data.max_skip_fraction`` of the images it tried to load."""
        tried = max(self.attempted_images, 1)
        if self.skipped_images == self.attempted_images >= self.cfg.optim.batch_size:
            raise DatasetError(
                f"none of the first {tried} images could be read (see the warnings above for their paths); "
                "check data.path"
            )
        if self.skipped_images > 10 and self.skipped_images / tried > self.cfg.data.max_skip_fraction:
            raise TrainingError(
                f"{self.skipped_images} unreadable images skipped out of {tried} "
                f"({100 * self.skipped_images / tried:.1f}% > data.max_skip_fraction={self.cfg.data.max_skip_fraction})"
                "; see the warnings above for their paths"
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng: list[dict] | None = None) -> dict:
        """The checkpoint (with FSDP: gathered to plain tensors; every rank must call it).

        ``rng``: every rank's RNG states (:func:`_gather_rng_states`); default this process's only.
        """
        rng = rng or [_rng_state()]
        if self.fsdp:
            from ibot.fsdp import full_model_state, full_optimizer_state

            model_sd, optim_sd = full_model_state(self.model), full_optimizer_state(self.optimizer)
        else:
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "seen_images": self.seen_images,
            "skipped_images": self.skipped_images,
            "attempted_images": self.attempted_images,
            "config": to_dict(self.cfg),
            "world_size": D.world_size(),
            "rng": rng[0],
            "rng_per_rank": rng,
            "format": "ibot-1",
        }

    def save_checkpoint(self) -> None:
        """Save (every rank calls it); a second call at the same position writes nothing new."""
        position = (self.epoch, self.step_in_epoch, self.global_step)
        if getattr(self, "_saved_at", None) == position:
            return
        rng = _gather_rng_states()  # every rank's streams (a collective: every rank calls it)
        state = self.state_dict(rng) if self.fsdp or D.is_main() else None
        if D.is_main():
            save_atomic(state, self.run_dir / CHECKPOINT, keep_previous=True)
        if D.is_dist():
            dist.barrier()
        self._last_save = time.time()
        self._saved_at = position

    def load_checkpoint_or_previous(self, path: Path) -> None:
        """Resume from ``path``; when it is missing or corrupt, from the one saved before it (with a message)."""
        prev = previous_path(path)
        try:  # only an unreadable file falls back; a checkpoint that does not fit this run is an error
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} is missing (a save was interrupted)")
            ckpt = load_safe(path)
        except CheckpointError as err:
            if not prev.is_file():
                raise
            self.log(f"warning: {err}; resuming from the previous checkpoint {prev} instead")
            path, ckpt = prev, load_safe(prev)
        self.load_checkpoint(path, ckpt)

    def load_checkpoint(self, path: str | Path, ckpt: dict | None = None) -> None:
        """Resume from ``path`` (``ckpt``: its content, when already read)."""
        ckpt = load_safe(path) if ckpt is None else ckpt
        if not isinstance(ckpt, dict) or ckpt.get("format") != "ibot-1":
            raise CheckpointError(
                f"{path} is not an ibot training checkpoint; to start from its weights use run.init_from={path}"
            )
        missing = [k for k in REQUIRED_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path} lacks {', '.join(missing)} (not a complete `ibot pretrain` checkpoint); "
                f"resume from another checkpoint or start from its weights with run.init_from={path}"
            )
        old, new = flatten(ckpt["config"]), flatten(to_dict(self.cfg))
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in STRUCTURAL_KEYS if old.get(k) != new.get(k)]
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was made with an incompatible config ({'; '.join(diff)}); "
                "use the same settings or a new run.output_dir"
            )
        self._check_schedules(path, ckpt)
        try:
            if self.fsdp:
                from ibot.fsdp import load_sharded_state

                load_sharded_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
            else:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path} does not fit this model ({first}); use the settings it was made with"
            ) from err
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.seen_images = ckpt["global_step"], ckpt.get("seen_images", 0)
        self.skipped_images = ckpt.get("skipped_images", 0)
        self.attempted_images = ckpt.get("attempted_images", self.skipped_images + self.seen_images // D.world_size())
        old_world = ckpt.get("world_size", 1)
        old_total = old.get("optim.batch_size", self.cfg.optim.batch_size) * old_world
        new_total = self.cfg.optim.batch_size * D.world_size()
        if old_total != new_total:
            # the epoch order is (seed, epoch)-determined: keep the images already trained on this epoch, in
            # steps of the new total batch (a larger batch or more processes: fewer steps per epoch)
            self.step_in_epoch = min(self.step_in_epoch * old_total // new_total, self.niter)
        if D.world_size() == old_world:
            # each rank continues its own streams (drop-path differs per rank); older checkpoints
            # hold rank 0's only
            per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]] * D.world_size()
            _set_rng_state(per_rank[D.rank()])

    def _check_schedules(self, path, ckpt: dict) -> None:
        """Refuse resuming with other lr / weight-decay / momentum schedules unless run.allow_schedule_change."""
        old, new = flatten(ckpt["config"]), flatten(to_dict(self.cfg))
        changed = [k for k in SCHEDULE_KEYS if k in old and old[k] != new[k]]
        if not changed:
            return
        step = ckpt["global_step"]
        was = Schedules.from_config(from_dict(ckpt["config"]), self.niter, ckpt.get("world_size", 1))[step]
        now = self.schedules[step]
        jump = (
            f"at step {step} the lr would go {was.lr:.3g} -> {now.lr:.3g} and the "
            f"teacher momentum {was.momentum:.6g} -> {now.momentum:.6g}"
        )
        what = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
        if not self.cfg.run.allow_schedule_change:
            raise CheckpointError(
                f"{path} was trained with other schedules ({what}); {jump}. Resume with the old values, "
                "or add run.allow_schedule_change=true to recompute the schedules over the new length"
            )
        self.log(f"schedules changed ({what}): {jump}")

    # ------------------------------------------------------------------ evaluation
    def evaluate_knn(self) -> dict | None:
        """k-NN of the teacher's CLS (train set as memory bank, test set as queries)."""
        cfg = self.cfg
        d, m = cfg.data, cfg.model
        bank = self.bank_set
        try:
            if d.dataset == "folder":
                self.log("k-NN skipped: data.dataset=folder has no labels")
                return None
            if cfg.run.knn_split == "val":
                bank, test_set = validation_split(self.bank_set)
                split = test_set.split
            else:
                test_set = dataset_from_config(cfg, train=False)
                split = getattr(test_set, "split", f"the {d.dataset} test split")
        except DatasetError as err:
            self.log(f"k-NN skipped: no labelled held-out images ({err})")
            return None
        if cfg.run.knn_train_limit:  # spread over the bank: a class-sorted folder keeps every class
            bank = spread_subset(bank, cfg.run.knn_train_limit)
        backbone = self.model.teacher["backbone"]
        backbone.eval()
        t0 = time.time()
        kw = dict(image_size=m.img_size, in_chans=m.in_chans, device=self.device, num_workers=d.num_workers)
        kw["progress"] = cfg.run.progress and D.is_main()
        with self._autocast():
            tr_f, tr_y = _gathered_features(backbone.forward_cls, bank, {**kw, "desc": "k-NN bank features"})
            te_f, te_y = _gathered_features(backbone.forward_cls, test_set, {**kw, "desc": "k-NN query features"})
        if not D.is_main():
            return None
        ks = sorted({10, 20, 100, 200, cfg.run.knn_k})
        acc = knn_classify(
            tr_f,
            tr_y,
            te_f,
            te_y,
            ks=ks,
            temperature=cfg.run.knn_temperature,
            num_classes=len(getattr(bank, "classes", [])) or None,
        )
        k = min(cfg.run.knn_k, tr_f.shape[0])
        top1, top5 = acc[k]
        res = {
            "k": k,
            "top1": top1,
            "top5": top5,
            "n_train": tr_f.shape[0],
            "n_test": te_f.shape[0],
            "epoch": self.epoch,
            "step": self.global_step,
            "train_minutes": getattr(self, "train_seconds", 0.0) / 60,
            "all": {str(kk): v for kk, v in acc.items()},
            "seconds": time.time() - t0,
            "split": split,
        }
        self.log(
            f"k-NN (teacher CLS, k={k}, T={cfg.run.knn_temperature}) on {d.dataset}: top-1 {top1:.2f}%  "
            f"top-5 {top5:.2f}%  ({tr_f.shape[0]} bank / {te_f.shape[0]} queries: {split}; epoch {self.epoch})"
        )
        if self.metrics:
            self.metrics.write({"step": self.global_step, "knn_top1": top1, "knn_top5": top5, "epoch": self.epoch})
            with open(self.run_dir / "knn.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
        return res


def _rng_state() -> dict:
    """This process's CPU torch, CUDA (current device, when initialised) and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather_rng_states() -> list[dict]:
    """Every rank's :func:`_rng_state`, in rank order (one process: a list of one)."""
    mine = _rng_state()
    if not D.is_dist():
        return [mine]
    parts = [None] * D.world_size()
    dist.all_gather_object(parts, mine)
    return parts


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), None))


def _gathered_features(encode, dataset, kw):
    """Features of a dataset, each rank extracting one contiguous shard, gathered on every rank.

    Every rank encodes the same number of images (the last shard overlaps the one before it), so
    ranks run the same number of forward passes, which FSDP2's collective all-gathers need.
    """
    if not D.is_dist():
        return extract_features(encode, dataset, **kw)
    n, w, r = len(dataset), D.world_size(), D.rank()
    per = -(-n // w)
    start = min(r * per, max(n - per, 0))
    local = extract_features(encode, slice_dataset(dataset, start, start + per), **kw)
    parts = [None] * w
    dist.all_gather_object(parts, local)
    feats, labels, covered = [], [], 0
    for i, (f, y) in enumerate(parts):  # keep each image once, in dataset order
        s = min(i * per, max(n - per, 0))
        skip = max(covered - s, 0)
        feats.append(f[skip:])
        labels.append(y[skip:])
        covered = max(covered, s + len(f))
    return torch.cat(feats), torch.cat(labels)


def _check_writable(folder: Path) -> None:
    """Fail now, with the fix, when the run folder cannot be written (not after an epoch of training)."""
    probe = folder / f".ibot-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def resume_config(path: Path) -> dict:
    """The saved config (nested dict) of the checkpoint to resume; of the previous one when it is corrupt."""
    if not path.exists() and not previous_path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}; start a new run without --resume")
    try:
        ckpt = load_safe(path) if path.is_file() or not previous_path(path).is_file() else None
    except CheckpointError:
        if not previous_path(path).is_file():
            raise
        ckpt = None
    if ckpt is None:
        ckpt = load_safe(previous_path(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ibot-1" or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(
            f"{path} is not an ibot training checkpoint; to start from its weights use run.init_from={path}"
        )
    return ckpt["config"]


def config_from_checkpoint(path: str | Path):
    ckpt = load_safe(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not an ibot training checkpoint (it has no config)")
    return from_dict(ckpt["config"])
