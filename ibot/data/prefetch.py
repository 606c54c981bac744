"""Host -> device transfer of training batches, and the bound on what DataLoader workers keep in flight.

* :class:`DeviceBatches`: iterates a loader's batches already on the training device. On CUDA,
  batch k+1's copy (``non_blocking``, from pinned memory) and, for ``data.pipeline=gpu``, its
  augmentation are queued on a side stream before batch k is handed out, so before the host waits
  on anything of step k; step k's stream waits on batch k's event only. On the CPU it is a plain loop.
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


class CudaStreams:
    """The stream operations :class:`DeviceBatches` uses on CUDA (a test passes a recording fake)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def side(self):
        return torch.cuda.Stream(self.device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def event(self):
        return torch.cuda.Event()

    def record(self, tensor: torch.Tensor, stream) -> None:
        if tensor.device.type == "cuda":
            tensor.record_stream(stream)  # made on the side stream, used (and freed) on ``stream``


class DeviceBatches:
    """Batches of ``loader`` on ``device``, optionally passed through ``augment(batch, generator)``.

    Args:
        loader: yields :class:`~ibot.data.loader.Batch` (any length-aware iterable).
        device: the training device.
        augment: the device half of ``data.pipeline=gpu`` (:class:`~ibot.data.device_augment.DeviceAugment`), or None.
        seed_of: step index in the epoch -> seed of that step's augmentation generator.
        start: the step index of the loader's first batch (a resumed epoch).
        streams: the stream operations (default: :class:`CudaStreams` on a CUDA device, none on the CPU).
    """

    def __init__(
        self,
        loader: Iterable,
        device: torch.device,
        augment: Callable | None = None,
        seed_of: Callable[[int], int] | None = None,
        start: int = 0,
        streams=None,
    ) -> None:
        self.loader, self.device, self.augment = loader, torch.device(device), augment
        self.seed_of, self.start = seed_of or (lambda step: step), start
        self.streams = streams if streams is not None or self.device.type != "cuda" else CudaStreams(self.device)

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, batch, step: int):
        batch = batch.to(self.device, non_blocking=True)
        if self.augment is not None:
            batch = self.augment(batch, torch.Generator().manual_seed(self.seed_of(step)))
        return batch

    def __iter__(self) -> Iterator:
        if self.streams is None:
            for k, batch in enumerate(self.loader):
                yield self._prepare(batch, self.start + k)
            return
        s = self.streams
        side, main = s.side(), s.current()
        it = iter(self.loader)

        def queue(step: int):
            """Batch ``step``'s copy and augmentation queued on the side stream, and its ready event."""
            batch = next(it, None)
            if batch is None:
                return None
            with s.use(side):
                batch = self._prepare(batch, step)
                ready = s.event()
                ready.record(side)
            return batch, ready

        step = self.start
        nxt = queue(step)
        while nxt is not None:
            cur, ready = nxt
            # batch k+1 is queued before batch k is handed out, so before the host can wait on step k
            nxt = queue(step + 1)
            main.wait_event(ready)  # step k waits for its own batch's copy and augmentation only
            for t in _tensors(cur):
                s.record(t, main)
            yield cur
            step += 1
