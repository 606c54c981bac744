"""The pretraining loop: orchestration only; each part it runs has its own owner.

Data: :class:`ibot.train.data.TrainingData`; schedules: :class:`ibot.train.schedules.Schedules`; one
step: :class:`ibot.train.step.TrainStep`; parallelism: :func:`ibot.train.parallelize.parallelize`;
checkpoints: :class:`ibot.train.checkpoint.Checkpointer`; collapse monitors: :mod:`ibot.train.monitors`;
the k-NN report: :func:`ibot.eval.protocols.pretrain_knn`.

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

from ibot import distributed as D
from ibot.builders.model import build_model
from ibot.builders.sources import CHECKPOINT
from ibot.config import ConfigError, to_dict
from ibot.data.datasets import DatasetError
from ibot.data.loader import Batch
from ibot.device import resolve_precision, training_device
from ibot.eval.baselines import no_gain_warning, score_line
from ibot.eval.protocols import pretrain_baselines, pretrain_knn
from ibot.io import remove_stale_temporaries
from ibot.train import runlock
from ibot.train.checkpoint import COUNTERS, Checkpointer
from ibot.train.data import TrainingData
from ibot.train.flags import DeviceFlags
from ibot.train.loggers import build_loggers
from ibot.train.metrics import MetricsWriter, plot_curves
from ibot.train.monitors import CollapseWarnings, collapse_monitors, collapse_warning
from ibot.train.parallelize import parallelize
from ibot.train.schedules import Schedules
from ibot.train.signals import SignalStopError, StopSignals
from ibot.train.step import TrainStep

NAN_ADVICE = (
    "the loss was not finite for {n} consecutive steps; the last good checkpoint is kept. Try: a lower optim.lr, "
    "a longer optim.warmup_epochs, run.precision=fp32, a lower AdamW beta2 (optim.betas=[0.9,0.99]), "
    "or a higher optim.momentum_teacher."
)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to try."""


class Trainer:
    """Pretrains the model a :class:`ibot.config.Config` describes.

    Args:
        cfg: resolved config (``ibot.config.build_config``).
        log: callable for human-readable lines (rank 0 only).
        resume: "auto" (resume when the run folder has a checkpoint), "never", or a checkpoint path.
    """

    def __init__(self, cfg, log=print, resume: str = "auto") -> None:
        self.cfg = cfg
        D.init_from_env(cfg.run.device)
        self.log = log if D.is_main() else (lambda *a, **k: None)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = training_device(cfg.run.device, distributed=D.is_dist())
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed + D.rank())
        random.seed(cfg.run.seed + D.rank())

        self.data = TrainingData(cfg, self.device)
        self.model = self._build_model().to(self.device)
        par = parallelize(self.model, cfg, self.device, self.log)
        self.ddp, self.fsdp, self.pad_ratio = par.ddp, par.fsdp, par.pad_ratio
        o = cfg.optim
        self.step_fn = TrainStep(
            self.model,
            par.forward_module,
            precision=self.precision,
            device_type=self.device.type,
            clip_grad=o.clip_grad,
            clip_mode=o.clip_mode,
            betas=tuple(o.betas),
        )
        self.optimizer, self.scaler = self.step_fn.optimizer, self.step_fn.scaler
        self.schedules = Schedules.from_config(cfg, self.data.niter, D.world_size(), self.model.teacher_temps)
        self.checkpointer = Checkpointer(
            cfg, self.model, self.optimizer, self.scaler, self.schedules, self.data.niter, fsdp=self.fsdp, log=self.log
        )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.bad_steps, self.skipped_images, self.seen_images, self.attempted_images = 0, 0, 0, 0
        self.flags = DeviceFlags(self.device)  # the steps' flags (train_step), read by fit's loop
        self._lock = self._lock_run_folder()
        counters = self.checkpointer.resume(resume)
        if counters:
            self._set_counters(counters)
            note = self.data.check_position(counters.get("data_position"), self.epoch, self.step_in_epoch)
            if note:
                self.log(f"warning: {note}")
        self.metrics = self._open_run_folder()

    # ------------------------------------------------------------------ setup
    def _build_model(self):
        """The config's model, with the ``run.init_from`` weights when given."""
        try:
            model = build_model(self.cfg, mask_generator=self.data.collate.mask_generator)  # the run's one
        except ValueError as err:  # the model settings do not fit the backbone: a config problem
            raise ConfigError(f"{err}; check the model.* and method keys") from err
        if self.cfg.run.init_from:
            from ibot.builders.sources import init_model_from

            self.log(init_model_from(model, self.cfg.run.init_from))
        return model

    def _lock_run_folder(self):
        """The run folder's lock (main rank; None on the others), once it proved writable; stale temporaries removed."""
        if not D.is_main():
            return None
        try:
            lock = runlock.acquire(self.run_dir, log=self.log)
            weakref.finalize(self, lock.release)
            _check_writable(self.run_dir)
        except OSError as err:
            raise TrainingError(
                f"run folder {self.run_dir} is not writable ({err.strerror or err}); choose another run.output_dir"
            ) from err
        remove_stale_temporaries(self.run_dir)
        return lock

    def _open_run_folder(self) -> MetricsWriter | None:
        """``config.json`` and the metrics writer (main rank; None on the others). Metrics lines after
        the step training starts from are dropped (resume, --fresh)."""
        if not D.is_main():
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        loggers = build_loggers(self.cfg.run.loggers, self.run_dir, to_dict(self.cfg), self.global_step)
        return MetricsWriter(self.run_dir, loggers, start_step=self.global_step)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return self.step_fn.autocast()

    def train_step(self, batch: Batch, it: int, stop_vote: bool = False):
        """Queue one optimisation step at global step ``it`` and return its :class:`ibot.train.step.StepResult`.

        Nothing is read back: the step's flags (non-finite loss, a rank's stop vote) are folded into
        ``self.flags`` on the device; :meth:`_read_flags` reads them on log steps, saves, stops and
        epoch ends, so the host queues the next steps while the device runs this one.
        """
        if self.pad_ratio is not None and batch.masks is not None:
            from ibot.train.compiled import pad_mask_batch

            batch.masks = pad_mask_batch(batch.masks, self.pad_ratio)  # host-side, before the copy
        res = self.step_fn(batch.to(self.device), self.schedules[it], stop_vote=stop_vote)
        self.flags.add(res.flags)
        return res

    def _read_flags(self) -> None:
        """Read the steps' flags since the last read (a host sync): stop after ``run.max_bad_steps``
        consecutive non-finite steps, warn about skipped ones, and take the ranks' stop vote."""
        r = self.flags.read()
        self.bad_steps, self.stop_voted = r.streak, r.stop
        if r.peak >= self.cfg.run.max_bad_steps:
            raise TrainingError(NAN_ADVICE.format(n=r.peak))
        if r.bad:
            self.log(
                f"warning: non-finite loss on {r.bad} step(s) up to step {self.global_step}; they were skipped "
                f"({r.streak} in a row now)"
            )

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train from the current position to ``optim.epochs`` (or ``run.max_steps``, ``run.time_limit_min``,
        SIGTERM / SIGINT: a checkpoint is saved first), then the final k-NN and the summary, which it returns."""
        self._log_start()
        try:
            with StopSignals() as signals:
                self._start_loop()
                for it, batch in self._steps():
                    self._count_images(batch)
                    vote = self._over_time_limit() and D.is_dist()  # rides on the step's all-reduced flags
                    # a batch whose every image was unreadable is counted above, with no step; under
                    # torchrun every rank skips it together (none is left alone in the step's collectives)
                    res = None if D.any_rank(batch.batch_size == 0) else self.train_step(batch, it, stop_vote=vote)
                    self._advance(batch)
                    # the host reads device values only here: log steps, saves, stops, epoch ends
                    over_time = self._over_time_limit() and not D.is_dist()
                    signalled, save_by_time = self._stop_flags(signals)
                    if self._at_read_step() or signalled or save_by_time or over_time:
                        self._read_flags()
                        self._log_step(res, batch, it)
                        self._save_if_due(save_by_time)
                    self._stopped = self._should_stop(signals, signalled, over_time)
                result = {**self._result, "train_minutes": self.train_seconds / 60}
                result["wall_minutes"] = (time.time() - self._t_start) / 60
            if signals.signum:
                raise self._signal_stop(signals)
            if self.cfg.run.knn_at_end:
                result["knn"] = self.evaluate_knn(baselines=self.cfg.run.baselines)
                self._end_of_run_warnings(result["knn"])
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

    def _log_start(self) -> None:
        cfg = self.cfg
        self.log(
            f"ibot: {cfg.method} on {cfg.data.dataset} ({self.data.n_images} images), {self._architecture()} "
            f"-> {self.run_dir} | {self.data.niter} steps/epoch x {cfg.optim.epochs} epochs, batch "
            f"{cfg.optim.batch_size}x{D.world_size()}, {self.device} {self.precision}, "
            f"data.pipeline={self.data.pipeline}"
        )
        if cfg.data.dataset in ("imagefolder", "folder") and getattr(self.data.train_set, "split", None):
            self.log(f"data: training on {self.data.train_set.split}")
        if self.global_step:
            self.log(f"resumed at epoch {self.epoch}, step {self.global_step}")

    def _architecture(self) -> str:
        """The backbone trained, in words (the timm name is only a template for custom widths)."""
        bb, m = self.model.teacher["backbone"], self.cfg.model
        if type(bb).__name__ != "MaskedViT":
            return f"{m.arch} (patch {m.patch_size}, {m.img_size} px)"
        shape = f"ViT {bb.embed_dim} wide x {len(bb.blocks)} blocks ({bb.num_heads} heads)"
        return f"{shape}, patch {bb.patch_size}, {m.img_size} px"

    def _start_loop(self) -> None:
        """The loop's state: where this invocation started, its clocks, and what it has to report."""
        self._max_steps = self.cfg.run.max_steps or self.cfg.optim.epochs * self.data.niter
        self._result, self._stopped = {}, False  # _result: the periodic k-NN
        self._t_start = time.time()
        self.last_record, self._last_print = None, 0.0
        self._step0, self._images0 = self.global_step, self.seen_images
        self.train_seconds = 0.0  # excludes evaluation
        self._collapse_warnings = CollapseWarnings(self.cfg)
        self._last_save = time.time()
        self.stop_voted = False
        self.flags = DeviceFlags(self.device)  # read on log steps, saves, stops, epoch ends

    def _steps(self):
        """``(global step index, batch)`` of every step from the current position on, epoch by epoch.

        Around each epoch's steps: the model in training mode, the progress bar, the epoch clock,
        and :meth:`_end_epoch`. Ends after a step that set ``self._stopped``.
        """
        while self.epoch < self.cfg.optim.epochs and not self._stopped:
            epoch = self.epoch
            self.model.train()
            batches = self.data.batches(epoch, self.step_in_epoch)
            self._bar = self._progress(epoch)
            self._t_last, self._n_last = time.time(), 0
            self._t_epoch = time.time()
            for batch in batches:
                yield epoch * self.data.niter + self.step_in_epoch, batch
                if self._stopped:
                    break
            self._end_epoch(epoch)

    def _count_images(self, batch: Batch) -> None:
        self.skipped_images += batch.n_skipped
        self.attempted_images += batch.batch_size + batch.n_skipped
        self._check_skips()

    def _over_time_limit(self) -> bool:
        limit = self.cfg.run.time_limit_min
        return bool(limit) and self.train_seconds + time.time() - self._t_epoch > 60 * limit

    def _advance(self, batch: Batch) -> None:
        self.step_in_epoch += 1
        self.global_step += 1
        if self._bar is not None:
            self._bar.update(1)
        self._n_last += batch.batch_size * batch.n_global
        self.seen_images += batch.batch_size * D.world_size()

    def _last_step(self) -> bool:
        """Whether the step just taken ends the epoch or the run."""
        return self.step_in_epoch == self.data.niter or self.global_step >= self._max_steps

    def _at_read_step(self) -> bool:
        """A step where every rank reads the flags: a log step, an epoch's or the run's last step, a
        ``run.save_every_steps`` save (the same steps on every rank)."""
        every = self.cfg.run.save_every_steps
        log_due = self.global_step % self.cfg.run.log_every == 0 or self._last_step()
        return log_due or bool(every and self.global_step % every == 0)

    def _log_step(self, res, batch: Batch, it: int) -> None:
        """Every ``run.log_every`` steps and at the end of an epoch / the run: the metrics line, the
        progress (bar or text line) and a collapse warning (at most one per epoch). Not after a
        skipped step (the flags were just read)."""
        last = self._last_step()
        if res is None or self.bad_steps or not (self.global_step % self.cfg.run.log_every == 0 or last):
            return
        rec = self._record(
            res.out, self.epoch, it, self._n_last / max(time.time() - self._t_last, 1e-9) / batch.n_global
        )
        self._t_last, self._n_last = time.time(), 0
        self.last_record = rec
        if self.metrics:
            self.metrics.write(rec)
        if self._bar is None:  # no progress bar: a text line now and then
            self._text_progress(rec, self.cfg.optim.epochs * self.data.niter, last)
        else:
            self._bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", ips=f"{rec['images_per_s']:.0f}")
        warn = self._collapse_warnings.check(rec)
        if warn:
            self.log(warn)

    def _stop_flags(self, signals: StopSignals) -> tuple[int, bool]:
        """(signal number or 0, time-based save due), the same on every rank.

        One process reads a Python flag and the clock. Under torchrun the ranks all-reduce them on
        read steps only (:meth:`_at_read_step`: log steps, saves, epoch ends), so every rank stops
        and saves at the same step. (The time limit rides on the step's own flags, see :meth:`train_step`.)
        """
        every = self.cfg.run.save_every_minutes
        flags = [signals.signum or 0, bool(every) and time.time() - self._last_save > 60 * every]
        if D.is_dist():
            if not self._at_read_step():
                return 0, False
            t = D.all_reduce_max(torch.tensor([float(f) for f in flags], device=self.device))
            flags = [int(v) for v in t.tolist()]
        return int(flags[0]), bool(flags[1])

    def _save_if_due(self, save_by_time: bool) -> None:
        every = self.cfg.run.save_every_steps
        save_due = every and self.global_step % every == 0
        if (save_due or save_by_time) and self.bad_steps == 0:  # never inside a streak of NaN losses
            self.save_checkpoint()

    def _should_stop(self, signals: StopSignals, signalled: int, over_time: bool) -> bool:
        """Whether training stops after this step: ``run.max_steps``, the time limit, a signal (logged)."""
        stop = self.global_step >= self._max_steps
        if self.cfg.run.time_limit_min:
            # one process: the clock after this step; several: any rank's vote taken before a step
            # since the last read, all-reduced with the steps' own flags (rank clocks differ; no extra sync)
            if self.stop_voted if D.is_dist() else over_time:
                self.log(f"time limit of {self.cfg.run.time_limit_min} min reached at step {self.global_step}")
                stop = True
        if signalled:
            signals.signum = signalled  # under torchrun: the signal of any rank
            self.log(f"{signals.name} received: saving a checkpoint at step {self.global_step} and stopping")
            stop = True
        return stop

    def _end_epoch(self, epoch: int) -> None:
        """After an epoch's steps: its training time; a finished epoch is saved (and copied every
        ``run.saveckp_freq`` epochs) and evaluated every ``run.knn_every``; a stopped one is saved."""
        cfg = self.cfg
        if self._bar is not None:
            self._bar.close()
        self.train_seconds += time.time() - self._t_epoch
        if self.step_in_epoch < self.data.niter:
            if self._stopped:
                self.save_checkpoint()
            return
        self.epoch += 1
        self.step_in_epoch = 0
        if self.bad_steps == 0:
            self.save_checkpoint()
        if cfg.run.saveckp_freq and epoch % cfg.run.saveckp_freq == 0 and epoch > 0 and D.is_main():
            shutil.copyfile(self.run_dir / CHECKPOINT, self.run_dir / f"checkpoint{epoch:04d}.pth")
        if cfg.run.knn_every and self.epoch % cfg.run.knn_every == 0 and self.epoch < cfg.optim.epochs:
            self._result["knn"] = self.evaluate_knn()

    def _signal_stop(self, signals: StopSignals) -> SignalStopError:
        return SignalStopError(
            f"stopped by {signals.name} at step {self.global_step} (epoch {self.epoch}); checkpoint "
            f"saved to {self.run_dir / CHECKPOINT}; continue with `ibot pretrain --resume {self.run_dir}`",
            signals.signum,
        )

    def _text_progress(self, rec: dict, total: int, last: bool) -> None:
        """One line every run.print_every_s seconds and at the end of each epoch (when the bar is off)."""
        now = time.time()
        if not last and now - self._last_print < self.cfg.run.print_every_s:
            return
        self._last_print = now
        self.log(
            f"epoch {rec['epoch'] + 1}/{self.cfg.optim.epochs} step {rec['step']}/{total} "
            f"({self.step_in_epoch}/{self.data.niter} in epoch): loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
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
            total=self.data.niter,
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
        rec.update(collapse_monitors(self.model, out, v.teacher_temp))
        return rec

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
    def _counters(self) -> dict:
        counters = {k: getattr(self, k) for k in COUNTERS}
        return {**counters, "data_position": self.data.position(self.epoch, self.step_in_epoch)}

    def _set_counters(self, counters: dict) -> None:
        for k in COUNTERS:
            setattr(self, k, counters[k])

    def save_checkpoint(self) -> None:
        """Save (every rank calls it); a second call at the same position writes nothing new."""
        if self.checkpointer.save(self._counters()):
            self._last_save = time.time()

    # ------------------------------------------------------------------ evaluation
    def evaluate_knn(self, baselines: bool = False) -> dict | None:
        """k-NN of the teacher's CLS (:func:`ibot.eval.protocols.pretrain_knn`), logged and written to
        ``knn.jsonl`` and the metrics; ``baselines``: with the raw-pixel and untrained-model scores beside it
        (:meth:`evaluate_baselines`)."""
        cfg = self.cfg
        extra = {"epoch": self.epoch, "step": self.global_step}
        extra["train_minutes"] = getattr(self, "train_seconds", 0.0) / 60
        backbone = self.model.teacher["backbone"]
        res = pretrain_knn(
            backbone, cfg, self.data.bank_set, device=self.device, autocast=self._autocast(), log=self.log, extra=extra
        )
        if res is None:
            return None
        self.log(
            f"k-NN (teacher CLS, k={res['k']}, T={cfg.run.knn_temperature}) on {cfg.data.dataset}: top-1 "
            f"{res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['n_train']} bank / {res['n_test']} queries: "
            f"{res['split']}; epoch {self.epoch})"
        )
        if baselines:
            self.evaluate_baselines(res)
        if self.metrics:
            rec = {"step": self.global_step, "knn_top1": res["top1"], "knn_top5": res["top5"], "epoch": self.epoch}
            rec.update({f"knn_{name}_top1": b["top1"] for name, b in res.get("baselines", {}).items()})
            self.metrics.write(rec)
            with open(self.run_dir / "knn.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
        return res

    def evaluate_baselines(self, knn: dict) -> None:
        """Raw pixels and the untrained model scored as ``knn`` (:func:`ibot.eval.protocols.pretrain_baselines`,
        cached in ``RUN/baselines.json``), into ``knn["baselines"]``, logged beside its score."""
        cfg = self.cfg
        folder = self.run_dir if D.is_main() else None
        base = pretrain_baselines(
            cfg, self.data.bank_set, device=self.device, autocast=self._autocast(), log=self.log, folder=folder
        )
        if not base:
            return
        knn["baselines"] = base
        self.log(score_line("k-NN", knn["top1"], knn["n_test"], base) + f" (k={knn['k']}, {knn['n_test']} queries)")

    def _end_of_run_warnings(self, knn: dict | None) -> None:
        """Once, at the end: no gain over the untrained model (or far below pixels), a collapsed teacher."""
        gain = no_gain_warning(knn["top1"], knn.get("baselines"), self.cfg) if knn else None
        for warn in (gain, collapse_warning(self.last_record or {}, self.cfg)):
            if warn:
                self.log(f"at the end of the run: {warn}")


def _check_writable(folder: Path) -> None:
    """Fail now, with the fix, when the run folder cannot be written (not after an epoch of training)."""
    probe = folder / f".ibot-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
