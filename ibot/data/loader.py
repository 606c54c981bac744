"""From a dataset to training batches: sampler, per-sample seeding, multi-crop collate with masks.

Every random choice of an epoch is a function of the run's seed and the position in the epoch,
never of how many workers ran or where a run was resumed: on the PIL path an image's crops come
from ``(seed, epoch, image index)`` and a batch's masks from ``(seed, epoch, index of its first
image)``; on the tensor path a batch's crops and masks come from ``(seed, epoch, rank, step)``. A
run killed mid-epoch and resumed gives the same batches as one that never stopped.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ibot.data.masking import MaskBatch, MaskGenerator


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass
class Batch:
    """A training batch.

    Attributes:
        global_crops: (G*B, C, H, W), crop-major.
        local_crops: (L*B, C, h, w) or None.
        masks: :class:`MaskBatch` of the global crops, or None (DINO).
        labels: (B,) (-1 when unlabelled; never used for training).
        n_global, n_local: G and L.
        n_skipped: unreadable samples dropped from this batch (all of them: ``batch_size`` 0, no crops).
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None
    masks: MaskBatch | None
    labels: torch.Tensor
    n_global: int
    n_local: int
    n_skipped: int = 0

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[0] // self.n_global

    def to(self, device, non_blocking: bool = True) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            mv(self.global_crops),
            mv(self.local_crops),
            None if self.masks is None else self.masks.to(device, non_blocking),
            self.labels,
            self.n_global,
            self.n_local,
            self.n_skipped,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy (what ``DataLoader(pin_memory=True)`` calls), for ``non_blocking`` copies."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(
            pin(self.global_crops),
            pin(self.local_crops),
            None if self.masks is None else self.masks.pin_memory(),
            pin(self.labels),
            self.n_global,
            self.n_local,
            self.n_skipped,
        )


class EpochSampler(torch.utils.data.Sampler):
    """Per-epoch permutation from ``(seed, epoch)``, split across ranks, starting at ``start_batch``.

    Yields the indices of this rank's full batches only (drop_last), so every rank sees the same
    number of steps and a resumed epoch skips exactly the batches already trained on. With
    ``with_epoch=True`` it yields ``(epoch, index)`` pairs: the epoch then travels with each index to
    the dataset and collate copies of persistent DataLoader workers (set ``epoch`` and
    ``start_batch`` on the main process's sampler between epochs and reuse the DataLoader).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
        shuffle: bool = True,
        with_epoch: bool = False,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start_batch, self.shuffle = rank, world, start_batch, shuffle
        self.with_epoch = with_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        gb = self.batch_size * self.world
        for s in range(self.start_batch, self.steps_per_epoch):
            chunk = order[s * gb : (s + 1) * gb]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            yield from ((self.epoch, i) for i in mine) if self.with_epoch else mine


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps a ``(PIL image, label)`` dataset: item i -> (crops, label, i), seeded by (seed, epoch, i).

    An ``(epoch, i)`` key (:class:`EpochSampler` with ``with_epoch``) gives ``(crops, label, i, epoch)``
    with that epoch instead of ``self.epoch``.
    """

    def __init__(self, dataset, transform, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        item = self.dataset[i]
        if item is None:
            return None
        img, label = item
        s = mix_seed(self.seed, epoch, i)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            crops = self.transform(img)
        random.setstate(state)
        return (crops, label, i, epoch) if isinstance(key, tuple) else (crops, label, i)


def stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, written straight into shared memory inside a DataLoader worker (as
    ``default_collate`` does), so sending the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class MultiCropCollate:
    """List of (crops, label, index) or None -> :class:`Batch`, with masks made here on the CPU."""

    def __init__(
        self, n_global: int, n_local: int, patch_size: int, mask_generator: MaskGenerator | None, seed: int = 0
    ) -> None:
        self.n_global, self.n_local, self.patch_size = n_global, n_local, patch_size
        self.mask_generator, self.seed, self.epoch = mask_generator, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.mask_generator is not None:
            self.mask_generator.set_epoch(epoch)

    def make_masks(self, n_images: int, h: int, w: int, *key: int) -> MaskBatch | None:
        if self.mask_generator is None:
            return None
        rng = random.Random(mix_seed(self.seed, self.epoch, 7919, *key))
        masks = self.mask_generator(n_images, h // self.patch_size, w // self.patch_size, rng)
        return MaskBatch.from_masks(masks, self.n_global)

    def __call__(self, samples) -> Batch:
        kept = [s for s in samples if s is not None]
        g, nl = self.n_global, self.n_local
        if not kept:  # every image unreadable: an empty batch (batch_size 0) the trainer counts and skips
            return Batch(torch.empty(0), None, None, torch.empty(0, dtype=torch.long), g, nl, len(samples))
        if len(kept[0]) > 3:  # the epoch travelled with the indices (persistent workers)
            self.set_epoch(kept[0][3])
        glob = stack_shared([s[0][i] for i in range(g) for s in kept])
        loc = stack_shared([s[0][g + i] for i in range(nl) for s in kept]) if nl else None
        labels = torch.tensor([s[1] for s in kept])
        mb = self.make_masks(glob.shape[0], glob.shape[-2], glob.shape[-1], kept[0][2])
        return Batch(glob, loc, mb, labels, g, nl, len(samples) - len(kept))


class TensorBatches:
    """Batches of an in-memory uint8 dataset augmented with :class:`BatchMultiCrop` in a prefetch thread."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sampler: EpochSampler,
        augment,
        collate: MultiCropCollate,
        prefetch: int = 2,
    ) -> None:
        self.images, self.labels, self.sampler = images, labels, sampler
        self.augment, self.collate, self.prefetch = augment, collate, prefetch

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch - self.sampler.start_batch

    def _make(self, step: int, idx: list[int]) -> Batch:
        s = self.sampler
        gen = torch.Generator().manual_seed(mix_seed(s.seed, s.epoch, s.rank, step))
        glob, loc = self.augment(self.images[idx], gen)
        mb = self.collate.make_masks(glob.shape[0], glob.shape[-2], glob.shape[-1], s.rank, step)
        return Batch(glob, loc, mb, self.labels[idx], self.collate.n_global, self.collate.n_local)

    def __iter__(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        b = self.sampler.batch_size

        def work():
            try:
                it = iter(self.sampler)
                for step in range(self.sampler.start_batch, self.sampler.steps_per_epoch):
                    idx = [next(it) for _ in range(b)]
                    item = self._make(step, idx)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
                q.put(err)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
