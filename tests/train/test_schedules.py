"""``Schedules``: every per-step value of a run, against the official schedules (``tests/reference.py``)."""

import numpy as np
import pytest
from reference import ref_cosine_scheduler, ref_teacher_temp_schedule

from ibot.config import build_config
from ibot.train.schedules import Schedules


def _cfg(*overrides):
    return build_config("smoke", list(overrides))


def test_from_config_matches_the_official_per_step_and_per_epoch_schedules():
    cfg = _cfg(
        "optim.epochs=6",
        "optim.lr=2e-3",
        "optim.min_lr=1e-5",
        "optim.warmup_epochs=2",
        "optim.weight_decay=0.05",
        "optim.weight_decay_end=0.3",
        "optim.momentum_teacher=0.99",
        "optim.freeze_last_layer=2",
        "loss.warmup_teacher_temp=0.03",
        "loss.teacher_temp=0.06",
        "loss.warmup_teacher_patch_temp=0.02",
        "loss.teacher_patch_temp=0.08",
        "loss.warmup_teacher_temp_epochs=3",
        "mask.start_epoch=1",
    )
    niter, world = 5, 2
    s = Schedules.from_config(cfg, niter, world)
    assert len(s) == 30
    np.testing.assert_allclose(s.lr, ref_cosine_scheduler(2e-3 * 32 / 256, 1e-5, 6, niter, 2), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.weight_decay, ref_cosine_scheduler(0.05, 0.3, 6, niter), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.momentum, ref_cosine_scheduler(0.99, 1.0, 6, niter), rtol=1e-12, atol=0)
    cls = ref_teacher_temp_schedule(0.03, 0.06, 3, 6)
    patch = ref_teacher_temp_schedule(0.02, 0.08, 3, 6, start_epoch=1)  # official pred_start_epoch shift
    for step in range(len(s)):
        v = s[step]
        e = step // niter
        assert (v.step, v.epoch) == (step, e)
        assert (v.lr, v.weight_decay, v.momentum) == (s.lr[step], s.weight_decay[step], s.momentum[step])
        assert v.teacher_temp == pytest.approx(cls[e], rel=1e-12)
        assert v.teacher_patch_temp == pytest.approx(patch[e], rel=1e-12)
        assert v.teacher_temps == (v.teacher_temp, v.teacher_patch_temp)
        assert v.freeze_last_layer is (e < 2)  # official cancel_gradients_last_layer: epoch < freeze


def test_cls_and_patch_temperatures_are_not_swapped():
    s = Schedules(
        4, 1, lr=1.0, warmup_epochs=0, teacher_temp=0.06, teacher_patch_temp=0.08, warmup_teacher_temp_epochs=1
    )
    assert s[3].teacher_temps == (0.06, 0.08)


def test_past_the_end_keeps_the_last_step_values_and_counts_epochs():
    s = Schedules(2, 3, lr=1.0, warmup_epochs=0, momentum_teacher=0.9)
    last, after = s[5], s[9]
    assert (after.lr, after.weight_decay, after.momentum) == (last.lr, last.weight_decay, last.momentum)
    assert after.epoch == 3 and after.step == 9


def test_bad_length_is_a_one_line_error():
    with pytest.raises(ValueError, match="at least one epoch and one step"):
        Schedules(1, 0, lr=1.0, warmup_epochs=0)
