"""The training data of a run: the dataset, the pipeline that augments it, and this rank's batches.

One owner for what the trainer used to wire by hand: which pipeline a config gets
(``data.pipeline``: tensor, pil or gpu), the dataset and the k-NN memory bank, the steps per epoch,
and, per epoch, this rank's deterministic batches from a resume position, on the training device.
The epoch reaches the data through the sampler only (:class:`ibot.data.loader.EpochSampler`), or, for a
stream (``data.streaming=true``), through its position in shared memory
(:class:`ibot.data.hf_stream.HFStream`), so one DataLoader with persistent workers serves the whole run.
"""

from __future__ import annotations

import atexit
import weakref

import torch

from ibot import distributed as D
from ibot.builders.data import (
    batch_augment_from_config,
    collate_from_config,
    crop_flip_dataset_from_config,
    crop_flip_from_config,
    dataset_from_config,
    device_augment_from_config,
    pil_transform_from_config,
    resolve_pipeline,
    stream_from_config,
)
from ibot.data.datasets import DatasetError, slice_dataset
from ibot.data.loader import EpochSampler, MultiCropDataset, TensorBatches, mix_seed
from ibot.data.prefetch import DeviceBatches, batch_bytes, prefetch_factor
from ibot.train.signals import ignore_stop_signals


class TrainingData:
    """The data side of ``ibot pretrain``.

    Args:
        cfg: the run's config.
        device: the training device (decides ``data.pipeline=auto`` and where batches land).

    Attributes:
        train_set: the (possibly ``data.limit``-ed) training dataset, or the stream; ``bank_set`` the k-NN
            memory bank (the whole training split; a stream's first rows); ``n_images`` the training images
            (a stream: the rows it declares). stream: the :class:`~ibot.data.hf_stream.HFStream`, or None.
        niter: steps per epoch (full batches over every rank).
        pipeline: "tensor", "pil" or "gpu".
    """

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        d = cfg.data
        self.stream = None
        if d.streaming:  # the rows stream; the k-NN sets are read when first evaluated
            self.pipeline = resolve_pipeline(d.pipeline, False, device.type)
            if self.pipeline == "tensor":
                raise DatasetError("data.pipeline=tensor needs an in-memory dataset; a stream takes pil or gpu")
            gpu = self.pipeline == "gpu"
            transform = crop_flip_from_config(cfg) if gpu else pil_transform_from_config(cfg)
            self.stream = stream_from_config(cfg, transform, D.rank(), D.world_size())
            self.train_set, self._bank_set, self.niter = self.stream, None, self.stream.niter
            self.n_images = self.stream.source.num_rows or self.niter * cfg.optim.batch_size * D.world_size()
        else:
            self._map_style(cfg)
        self.collate = collate_from_config(cfg)
        self.augment = self.device_augment = self.mc_dataset = self.loader = None
        if self.pipeline == "tensor":
            self.augment = batch_augment_from_config(cfg)
        elif self.pipeline == "gpu":
            if self.stream is None:
                self.mc_dataset = crop_flip_dataset_from_config(cfg, self.train_set)
            self.device_augment = device_augment_from_config(cfg)
        elif self.stream is None:
            self.mc_dataset = MultiCropDataset(self.train_set, pil_transform_from_config(cfg), seed=cfg.run.seed)

    def _map_style(self, cfg) -> None:
        """The training set of a map-style dataset, its steps per epoch and its pipeline."""
        d, m = cfg.data, cfg.model
        self.train_set = dataset_from_config(cfg, train=True)
        self._bank_set = self.train_set  # the k-NN memory bank is the whole training split
        if d.limit:
            self.train_set = slice_dataset(self.train_set, 0, d.limit)
        n, b, w = len(self.train_set), cfg.optim.batch_size, D.world_size()
        if n < b * w:
            raise DatasetError(
                f"the dataset has {n} images, fewer than one batch ({b} x {w} processes); "
                "lower optim.batch_size or add images"
            )
        self.niter, self.n_images = n // (b * w), n
        in_memory = hasattr(self.train_set, "images")
        self.pipeline = resolve_pipeline(d.pipeline, in_memory, self.device.type)
        if self.pipeline == "tensor" and not in_memory:
            raise DatasetError("data.pipeline=tensor needs an in-memory dataset; use data.pipeline=pil for folders")
        if self.pipeline == "tensor" and self.train_set.images.shape[1] != m.in_chans:
            ch = self.train_set.images.shape[1]
            raise DatasetError(f"the dataset has {ch} channel(s) but model.in_chans={m.in_chans}")

    @property
    def bank_set(self):
        """The k-NN memory bank: the training split (a stream: its first rows, :func:`dataset_from_config`)."""
        if self._bank_set is None:
            self._bank_set = dataset_from_config(self.cfg, train=True)
        return self._bank_set

    def batches(self, epoch: int, start_step: int = 0) -> DeviceBatches:
        """This rank's batches of ``epoch`` from ``start_step`` on (deterministic), on the training device."""
        seed, rank = self.cfg.run.seed, D.rank()
        if self.pipeline == "tensor":
            sampler = EpochSampler(
                len(self.train_set), self.cfg.optim.batch_size, seed, epoch, rank, D.world_size(), start_step
            )
            loader = TensorBatches(self.train_set.images, self.train_set.labels, sampler, self.augment, self.collate)
        else:
            loader = self._dataloader(epoch, start_step)
        return DeviceBatches(
            loader, self.device, self.device_augment, lambda step: mix_seed(seed, epoch, rank, step, 104729), start_step
        )

    def _dataloader(self, epoch: int, start_step: int) -> torch.utils.data.DataLoader:
        """One DataLoader for the whole run (persistent workers); the epoch and start step travel with the
        indices (map-style) or in the stream's shared position."""
        if self.loader is None:
            d, m, b = self.cfg.data, self.cfg.model, self.cfg.optim.batch_size
            crops = [(d.global_crops_number, m.img_size), (d.local_crops_number, d.local_crop_size)]
            size = batch_bytes(b, m.in_chans, crops, 1 if self.pipeline == "gpu" else 4)
            seed, rank, world = self.cfg.run.seed, D.rank(), D.world_size()
            kw = {}
            if self.stream is None:
                kw["sampler"] = EpochSampler(len(self.train_set), b, seed, epoch, rank, world, with_epoch=True)
            self.loader = torch.utils.data.DataLoader(
                self.mc_dataset if self.stream is None else self.stream,
                batch_size=b,
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
                **kw,
            )
            if d.num_workers:
                atexit.register(_close_at_exit, weakref.ref(self))
        if self.stream is not None:
            self.stream.set_position(epoch, start_step)
        else:
            self.loader.sampler.epoch, self.loader.sampler.start_batch = epoch, start_step
        return self.loader

    def position(self, epoch: int, step: int) -> dict | None:
        """Where a stream stands at ``step`` of ``epoch``, for the checkpoint: the layout (processes, workers,
        batch) and the training rows every rank's worker slots have read (None for map-style data, whose
        position is the step)."""
        if self.stream is None:
            return None
        workers, world = max(1, self.cfg.data.num_workers), D.world_size()
        rows = self.stream.rows_read(step, workers)  # the same on every rank
        layout = {"processes": world, "workers": workers, "batch": self.cfg.optim.batch_size}
        return {"epoch": epoch, "step_in_epoch": step, **layout, "rows_read": [rows] * world}

    def check_position(self, saved: dict | None, epoch: int, step: int) -> str | None:
        """A warning when a resumed stream cannot continue exactly where the checkpoint's ``saved`` position
        says (another layout mid-epoch, or no position saved); None when it does."""
        if self.stream is None or not step:
            return None
        now = self.position(epoch, step)
        keys = ("processes", "workers", "batch")
        if saved and all(saved.get(k) == now[k] for k in keys) and saved.get("rows_read") == now["rows_read"]:
            return None
        was = " x ".join(str((saved or {}).get(k, "?")) for k in keys)
        return (
            f"the stream was read as {was} (processes x data.num_workers x batch), now "
            f"{' x '.join(str(now[k]) for k in keys)}: epoch {epoch} continues at step {step} split anew, so some "
            "of its rows may repeat or be missed; resume with the old layout for an exact resume"
        )

    def close(self) -> None:
        """Stop the DataLoader's persistent workers (a later :meth:`batches` starts new ones)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None


def _close_at_exit(ref: weakref.ref) -> None:
    """At interpreter exit, stop the workers of a :class:`TrainingData` still alive then (a Trainer kept in
    a notebook, a script's global or a test's traceback): torch would otherwise hang the exit."""
    data = ref()
    if data is not None:
        data.close()
