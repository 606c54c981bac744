"""Issue 25: the host runs ahead of the device.

Between log steps the real ``Trainer.fit`` loop reads no device value (counted from outside, by
patching every way a tensor reaches the host), so steps k+1, k+2, ... are queued before anything of
step k is read; the non-finite skip and its streak stay on the device and still stop the run.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import pytest
import torch

from ibot.config import build_config
from ibot.data.prefetch import DeviceBatches
from ibot.train.flags import DeviceFlags
from ibot.train.trainer import Trainer, TrainingError

READS = ("tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


def _trainer(tmp_path, *ov):
    over = [
        f"run.output_dir={tmp_path}",
        "run.progress=false",
        "run.knn_at_end=false",
        "optim.epochs=4",
        "optim.batch_size=4",
        *ov,
    ]
    return Trainer(build_config("smoke", over), log=lambda *a: None)


def _record_events(tr, monkeypatch, events: list | None = None) -> list:
    """``("queue", step index)`` when a step is handed to ``TrainStep`` and ``("read", global step)``
    at every host read of a tensor by the training loop's thread, except inside the loader's
    ``next`` (the loader and its threads read host-made tensors, not device values)."""
    events = [] if events is None else events
    in_data, loop = [False], threading.get_ident()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, **k):
            if not in_data[0] and threading.get_ident() == loop:
                events.append(("read", tr.global_step))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    step_fn, batches = tr.step_fn, tr.data.batches

    def queue(batch, values, **kw):
        events.append(("queue", tr.global_step))
        return step_fn(batch, values, **kw)

    def loader(*a, **k):
        it = iter(batches(*a, **k))
        while True:
            in_data[0] = True
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                in_data[0] = False
            yield batch

    tr.step_fn, tr.data.batches = queue, loader
    return events


def test_between_log_steps_the_loop_reads_nothing_from_the_device(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, "run.log_every=4", "run.max_steps=8")
    assert tr.data.niter > 8  # no epoch end inside the run: only the log steps 4 and 8 read
    events = _record_events(tr, monkeypatch)
    tr.fit()
    read_at = {step for kind, step in events if kind == "read"}
    assert read_at == {4, 8}, sorted(read_at)  # before: a read after every step (0, 1, 2, ...)
    first_read = next(i for i, e in enumerate(events) if e[0] == "read")
    assert [e for e in events[:first_read]] == [("queue", k) for k in range(4)]  # steps 0-3 queued unread
    assert [e for e in events if e[0] == "queue"] == [("queue", k) for k in range(8)]
    assert tr.last_record["step"] == 8  # the log steps still log


class _CountingStreams:
    """Stream operations for :class:`ibot.data.prefetch.DeviceBatches` on the CPU: each batch queued
    on the (fake) side stream adds ``("batch queued", n)`` to ``events``."""

    def __init__(self, events):
        self.events, self.n = events, 0

    def side(self):
        return self

    def current(self):
        return self

    def use(self, stream):
        return contextlib.nullcontext()

    def event(self):
        self.events.append(("batch queued", self.n))
        self.n += 1
        return self

    def record(self, *a):  # event.record(stream) and streams.record(tensor, stream)
        pass

    def wait_event(self, event):
        pass


def test_the_next_batch_is_queued_before_the_loop_reads_a_step(tmp_path, monkeypatch):
    """The whole loop with the CUDA prefetch order (fake streams): when the host reads at log step
    4 (steps 0-3 queued), batch 4 is already queued on the side stream."""
    events = []
    streams = _CountingStreams(events)
    monkeypatch.setattr("ibot.train.data.DeviceBatches", functools.partial(DeviceBatches, streams=streams))
    tr = _trainer(tmp_path, "run.log_every=4", "run.max_steps=8")
    _record_events(tr, monkeypatch, events)
    tr.fit()
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    assert {events[i][1] for i in reads} == {4, 8}
    for i in reads:
        step = events[i][1]  # steps 0 .. step-1 are queued; batch `step` must be on its way
        queued = [n for kind, n in events[:i] if kind == "batch queued"]
        assert step in queued or step == 8, (step, queued)  # 8: the last step, no batch after it
    first = reads[0]
    assert ("batch queued", 4) in events[:first] and ("queue", 3) in events[:first]


def _poison(tr, bad_calls: set[int], snapshots: dict | None = None):
    """Steps whose call number (from 1) is in ``bad_calls`` get a NaN loss; ``snapshots[n]``: the
    model's state after call n."""
    real, calls = tr.model.step, [0]

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls[0] += 1
        if calls[0] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    tr.model.step = poisoned
    if snapshots is not None:
        step_fn = tr.step_fn

        def step(*a, **k):
            res = step_fn(*a, **k)
            snapshots[calls[0]] = {n: v.clone() for n, v in tr.model.state_dict().items()}
            return res

        tr.step_fn = step


def test_a_skipped_step_between_reads_changes_nothing_and_is_reported(tmp_path):
    lines = []
    tr = _trainer(tmp_path, "run.log_every=10", "run.max_steps=3")
    tr.log = lines.append
    snaps = {}
    _poison(tr, {3}, snaps)
    tr.fit()
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, snaps[2][k]), k  # student, teacher and centers as after step 2
    assert any("non-finite loss on 1 step(s) up to step 3" in x for x in lines), lines
    assert tr.last_record is None  # the only log step (3, the last) was skipped: nothing logged


def test_a_streak_that_ended_before_the_read_still_stops_the_run(tmp_path):
    """Steps 2 and 3 are not finite, step 4 is: the read at step 4 sees the streak of 2."""
    tr = _trainer(tmp_path, "run.log_every=4", "run.max_bad_steps=2", "run.max_steps=8")
    _poison(tr, {2, 3})
    with pytest.raises(TrainingError, match="not finite for 2 consecutive steps.*lower optim.lr"):
        tr.fit()
    assert tr.global_step == 4


def test_device_flags_fold_streak_peak_count_and_vote():
    f = DeviceFlags("cpu")
    for bad, stop in [(1, 0), (1, 0), (0, 1), (1, 0)]:
        f.add(torch.tensor([float(bad), float(stop)]))
    r = f.read()
    assert (r.streak, r.peak, r.bad, r.stop) == (1, 2, 3, True)
    f.add(torch.tensor([1.0, 0.0]))
    r = f.read()  # the streak goes on across a read; the counts start again
    assert (r.streak, r.peak, r.bad, r.stop) == (2, 2, 1, False)


def _vote_worker(rank, world, port, run, out_path):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    over = ["run.log_every=4", "run.time_limit_min=1000", "optim.batch_size=4", "run.knn_at_end=false"]
    tr = Trainer(
        build_config("smoke", [f"run.output_dir={run}", "run.progress=false", "optim.epochs=4", *over]),
        log=lambda *a: None,
        resume="never",
    )
    if rank == 1:  # only this rank's clock is over the limit, from the second step on
        tr._over_time_limit = lambda: tr.global_step >= 1
    tr.fit()
    torch.save({"step": tr.global_step, "niter": tr.data.niter}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_one_ranks_time_limit_vote_stops_every_rank_at_the_same_read_step(tmp_path):
    """The vote rides on the steps' all-reduced flags and is read at the next log step (4), on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "stop"
    mp.spawn(_vote_worker, args=(2, port, str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["niter"] > 4  # the stop is the vote's, not an epoch end
    assert r0["step"] == r1["step"] == 4  # before: step 2, the step after the vote
