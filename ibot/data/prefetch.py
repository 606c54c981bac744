"""Host -> device transfer of training batches, and the bound on what DataLoader workers keep in flight.

* :class:`DeviceBatches`: iterates a loader's batches already on the training device. On CUDA the
  next batch is copied (``non_blocking``, from pinned memory) and, for ``data.pipeline=gpu``,
  augmented on a side stream while the current step runs; on the CPU it is a plain loop.
* :func:`prefetch_factor`: the DataLoader ``prefetch_factor`` that keeps ``workers x prefetch``
  batches under a shared-memory budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

SHM_BUDGET_BYTES = 2 << 30  # batches in flight per rank (shared memory), see prefetch_factor


def batch_bytes(batch_size: int, in_chans: int, crops: list[tuple[int, int]], bytes_per_value: int) -> int:
    """Size of one batch's crops: ``crops`` lists (number, size) of the global and local crops."""
    return batch_size * in_chans * sum(n * s * s for n, s in crops) * bytes_per_value


def prefetch_factor(num_workers: int, bytes_per_batch: int, budget: int = SHM_BUDGET_BYTES) -> int | None:
    """Batches each worker prepares ahead: 4 at most, fewer when ``workers x factor`` batches exceed
    ``budget`` (never below 1; None without workers, as DataLoader requires)."""
    if num_workers <= 0:
        return None
    return int(max(1, min(4, budget // max(1, num_workers * bytes_per_batch))))


def _tensors(batch) -> list[torch.Tensor]:
    out = [batch.global_crops, batch.local_crops, batch.labels]
    if batch.masks is not None:
        out += [v for v in vars(batch.masks).values() if isinstance(v, torch.Tensor)]
    return [t for t in out if t is not None]


class DeviceBatches:
    """Batches of ``loader`` on ``device``, optionally passed through ``augment(batch, generator)``.

    Args:
        loader: yields :class:`~ibot.data.loader.Batch` (any length-aware iterable).
        device: the training device.
        augment: the device half of ``data.pipeline=gpu`` (:class:`~ibot.data.device_augment.DeviceAugment`), or None.
        seed_of: step index in the epoch -> seed of that step's augmentation generator.
        start: the step index of the loader's first batch (a resumed epoch).
    """

    def __init__(
        self,
        loader: Iterable,
        device: torch.device,
        augment: Callable | None = None,
        seed_of: Callable[[int], int] | None = None,
        start: int = 0,
    ) -> None:
        self.loader, self.device, self.augment = loader, torch.device(device), augment
        self.seed_of, self.start = seed_of or (lambda step: step), start

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, batch, step: int):
        batch = batch.to(self.device, non_blocking=True)
        if self.augment is not None:
            batch = self.augment(batch, torch.Generator().manual_seed(self.seed_of(step)))
        return batch

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            for k, batch in enumerate(self.loader):
                yield self._prepare(batch, self.start + k)
            return
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        it = iter(self.loader)

        def load(step: int):
            batch = next(it, None)
            if batch is None:
                return None
            with torch.cuda.stream(side):
                return self._prepare(batch, step)

        step = self.start
        cur = load(step)
        while cur is not None:
            main.wait_stream(side)  # the step waits for its batch's copy and augmentation, nothing else
            for t in _tensors(cur):
                if t.device.type == "cuda":
                    t.record_stream(main)  # made on the side stream, used (and freed) on the main one
            yield cur
            # the step on ``cur`` is queued (its backward and update still run): copy the next meanwhile
            step += 1
            cur = load(step)
