"""From a dataset to training batches: sampler, per-sample seeding, multi-crop collate with masks.

Every random choice of an epoch is a function of the run's seed and the position in the epoch,
never of how many workers ran or where a run was resumed: on the PIL path an image's crops come
from ``(seed, epoch, image index)`` and a batch's masks from ``(seed, epoch, index of its first
image)``; on the tensor path a batch's crops and masks come from ``(seed, epoch, rank, step)``. A
run killed mid-epoch and resumed gives the same batches as one that never stopped.

The epoch has one source, the :class:`EpochSampler` (``set_epoch``, as ``DistributedSampler``): with
``with_epoch=True`` it travels with each index to :class:`MultiCropDataset` and on to
:class:`MultiCropCollate` (also into persistent DataLoader workers); :class:`TensorBatches` reads it
from its sampler. The dataset, the collate and the mask generator hold no epoch.
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
    the dataset and collate copies of persistent DataLoader workers (:meth:`set_epoch` and
    ``start_batch`` on the main process's sampler between epochs, and reuse the DataLoader).
    Lightning calls :meth:`set_epoch` at every epoch, as for a ``DistributedSampler``.
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

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next ``iter()``: its permutation, crops and masks."""
        self.epoch = int(epoch)

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
    """Wraps a ``(PIL image, label)`` dataset: key ``(epoch, i)`` -> ``(crops, label, i, epoch)``, the
    crops seeded by ``(seed, epoch, i)``.

    The keys come from :class:`EpochSampler` with ``with_epoch=True``; a plain index ``i`` is epoch 0.
    """

    def __init__(self, dataset, transform, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        item = self.dataset[i]
        if item is None:
            return None
        img, label = item
        return seeded_crops(self.transform, img, self.seed, epoch, i), label, i, epoch


def seeded_crops(transform, img, seed: int, epoch: int, i: int):
    """``transform(img)`` with Python's and torch's CPU generators seeded by ``(seed, epoch, i)`` (``i``: the
    image's index, or a streamed row's id), the callers' generators left as they were."""
    s = mix_seed(seed, epoch, i)
    state = random.getstate()
    # only the CPU generator: torch.manual_seed would also reset the CUDA generators (drop path's,
    # when the workers are the main process) to this image's seed
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(s)
        random.seed(s)
        crops = transform(img)
    random.setstate(state)
    return crops


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
    """List of (crops, label, index, epoch) or None -> :class:`Batch`, with the masks (and the
    masked-token index and loss weights, :class:`MaskBatch`) made here on the CPU.

    Args:
        n_global, n_local: crops per image.
        mask_cell: pixels per mask cell: the global crops get an ``(H // cell, W // cell)`` mask grid
            (``ibot.grid.mask_cell``: the ViT patch, or Swin's final-stage cell).
        mask_generator: the masks, or None (DINO).
        seed: the run's seed (masks come from ``(seed, epoch, index of the batch's first image)``).
    """

    def __init__(
        self, n_global: int, n_local: int, mask_cell: int, mask_generator: MaskGenerator | None, seed: int = 0
    ) -> None:
        self.n_global, self.n_local, self.mask_cell = n_global, n_local, mask_cell
        self.mask_generator, self.seed = mask_generator, seed

    def make_masks(self, n_images: int, h: int, w: int, epoch: int, *key: int) -> MaskBatch | None:
        """Masks of ``n_images`` global crops of ``h`` x ``w`` pixels at ``epoch``, seeded by ``key``."""
        if self.mask_generator is None:
            return None
        rng = random.Random(mix_seed(self.seed, epoch, 7919, *key))
        masks = self.mask_generator(n_images, h // self.mask_cell, w // self.mask_cell, rng, epoch)
        return MaskBatch.from_masks(masks, self.n_global)

    def __call__(self, samples) -> Batch:
        kept = [s for s in samples if s is not None]
        g, nl = self.n_global, self.n_local
        if not kept:  # every image unreadable: an empty batch (batch_size 0) the trainer counts and skips
            return Batch(torch.empty(0), None, None, torch.empty(0, dtype=torch.long), g, nl, len(samples))
        epoch = kept[0][3] if len(kept[0]) > 3 else 0  # the epoch travelled with the indices
        glob = stack_shared([s[0][i] for i in range(g) for s in kept])
        loc = stack_shared([s[0][g + i] for i in range(nl) for s in kept]) if nl else None
        labels = torch.tensor([s[1] for s in kept])
        mb = self.make_masks(glob.shape[0], glob.shape[-2], glob.shape[-1], epoch, kept[0][2])
        return Batch(glob, loc, mb, labels, g, nl, len(samples) - len(kept))


class TensorBatches:
    """Batches of an in-memory uint8 dataset augmented with :class:`BatchMultiCrop` in a prefetch thread
    (the epoch is the sampler's)."""

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
        mb = self.collate.make_masks(glob.shape[0], glob.shape[-2], glob.shape[-1], s.epoch, s.rank, step)
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
