"""Issue 25: the prefetch overlaps. With recording fake streams and events (no GPU needed), batch k+1's
copy and augmentation are queued on the side stream before batch k is handed to the step, so before
the host can wait on anything of step k; step k's stream waits on batch k's event only, and batch
k's tensors are recorded on that stream."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ibot.data.prefetch import DeviceBatches


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(f"{self.name} waits {event.name}")


class _Event:
    def __init__(self, streams):
        self.streams, self.name = streams, None

    def record(self, stream):
        self.name = f"event {self.streams.last}"  # of the batch just augmented
        self.streams.log.append(f"{self.name} on {stream.name}")


class _Streams:
    """What :class:`ibot.data.prefetch.CudaStreams` does, as lines in ``log``."""

    def __init__(self):
        self.log, self.active, self.last = [], "main", None

    def side(self):
        return _Stream("side", self.log)

    def current(self):
        return _Stream("main", self.log)

    @contextmanager
    def use(self, stream):
        prev, self.active = self.active, stream.name
        try:
            yield
        finally:
            self.active = prev

    def event(self):
        return _Event(self)

    def record(self, tensor, stream):
        self.log.append(f"record batch {int(tensor[0])} on {stream.name}")


class _Batch:
    def __init__(self, k, streams):
        self.k, self.streams = k, streams
        self.global_crops, self.local_crops, self.labels, self.masks = torch.full((2,), k), None, None, None

    def to(self, device, non_blocking=False):
        assert non_blocking  # from pinned memory, no host wait
        self.streams.log.append(f"copy {self.k} on {self.streams.active}")
        return self


def _augment(streams):
    def augment(batch, gen):
        streams.last = batch.k
        streams.log.append(f"augment {batch.k} on {streams.active}")
        return batch

    return augment


def test_next_batch_is_queued_on_the_side_stream_before_the_step_can_wait():
    s = _Streams()
    loader = [_Batch(k, s) for k in range(3)]
    for b in DeviceBatches(loader, torch.device("cpu"), _augment(s), streams=s):
        s.log.append(f"step {b.k} queued")
        s.log.append(f"step {b.k} read")  # the host waits on step k (a log step)
    log = s.log
    at = log.index
    for k in range(3):
        assert at(f"copy {k} on side") < at(f"augment {k} on side") < at(f"event {k} on side")
        assert at(f"event {k} on side") < at(f"main waits event {k}") < at(f"step {k} queued")
        assert at(f"record batch {k} on main") < at(f"step {k} queued")
    for k in range(2):  # overlap: batch k+1 queued before step k even starts, so before its read
        assert at(f"event {k + 1} on side") < at(f"step {k} queued") < at(f"step {k} read")
    # step k waits for its own batch only, never for the batch queued behind it
    waits = [x for x in log if " waits " in x]
    assert waits == [f"main waits event {k}" for k in range(3)]
    assert at("main waits event 0") < at("step 0 queued") < at("main waits event 1")
