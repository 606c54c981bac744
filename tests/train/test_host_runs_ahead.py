"""Issue 25: the host runs ahead of the device.

Between log steps the real ``Trainer.fit`` loop reads no device value (counted from outside, by
patching every way a tensor reaches the host), so steps k+1, k+2, ... are queued before anything of
step k is read; the non-finite skip and its streak stay on the device and still stop the run.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ibot.config import build_config
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


def _record_events(tr, monkeypatch) -> list:
    """``("queue", step index)`` when a step is handed to ``TrainStep`` and ``("read", global step)``
    at every host read of a tensor by the training loop's thread, except inside the loader's
    ``next`` (the loader and its threads read host-made tensors, not device values)."""
    events, in_data, loop = [], [False], threading.get_ident()
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
