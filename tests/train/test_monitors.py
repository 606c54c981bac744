import math

import torch

from ibot.config import build_config
from ibot.train.monitors import CollapseWarnings, collapse_warning, rankme


def test_rankme_counts_the_directions_features_use():
    assert abs(rankme(torch.ones(64, 16)) - 1.0) < 0.01  # one direction
    assert abs(rankme(torch.eye(16)) - 16.0) < 0.01  # all directions equally
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(256, 3, generator=gen) @ torch.randn(3, 32, generator=gen)  # rank-3 features
    assert rankme(low) < 3.0 < rankme(torch.randn(256, 32, generator=gen))


def _rec(epoch, step, **kw):
    healthy = {"teacher_entropy": 2.0, "teacher_entropy_max": 4.0, "prototypes_used": 30}
    return {"epoch": epoch, "step": step, "feature_rank": 20.0, "feature_dim": 32, **healthy, **kw}


def test_collapse_warning_is_silent_in_the_first_epoch_and_when_healthy():
    assert collapse_warning(_rec(0, 1, prototypes_used=1)) is None
    assert collapse_warning(_rec(2, 9)) is None
    assert "collapse to one prototype" in collapse_warning(_rec(2, 9, prototypes_used=1))


def test_collapse_warnings_say_it_once_per_epoch():
    warnings = CollapseWarnings()
    bad = {"prototypes_used": 1}
    assert warnings.check(_rec(1, 10, **bad)).startswith("epoch 1, step 10: warning:")
    assert warnings.check(_rec(1, 11, **bad)) is None  # same epoch: once
    assert warnings.check(_rec(2, 20)) is None  # healthy
    assert warnings.check(_rec(2, 21, **bad)).startswith("epoch 2, step 21:")


def test_few_of_many_prototypes_warns_and_the_advice_reads_the_config():
    record = _rec(3, 90, prototypes_used=5, teacher_entropy_max=math.log(512), prototypes_possible=128)
    assert "5 of 128 in use; collapse to few prototypes" in collapse_warning(record)
    old = _rec(3, 90, prototypes_used=4, teacher_entropy_max=math.log(512))  # a record without the count
    assert "4 of 512 in use" in collapse_warning(old)
    assert collapse_warning(_rec(3, 90, prototypes_used=40, prototypes_possible=128)) is None
    default = build_config("smoke")
    tried = build_config(
        "smoke", ["loss.centering=sinkhorn", "loss.teacher_temp=0.04", "optim.warmup_epochs=5", "optim.epochs=20"]
    )
    a, b = collapse_warning(record, default), collapse_warning(record, tried)
    assert "loss.centering=sinkhorn" in a and "loss.centering=sinkhorn" not in b  # already set: not advised
    assert "now 0.07, e.g. 0.1" in a and "now 0.04, e.g. 0.06" in b and "now 5, e.g. 10" in b
    low_rank = {"feature_rank": 2.0, "feature_dim": 192}
    assert "try loss.koleo_weight=0.1" in collapse_warning(_rec(2, 9, **low_rank), default)
    koleo = collapse_warning(_rec(2, 9, **low_rank), build_config("smoke", ["loss.koleo_weight=2.0"]))
    assert "koleo_weight=0.1" not in koleo and "loss.koleo_weight is already 2" in koleo and "optim.lr" in koleo


def test_few_prototypes_is_said_once_per_run_one_prototype_once_per_epoch():
    warnings = CollapseWarnings()
    few = {"prototypes_used": 5, "prototypes_possible": 128}
    assert "5 of 128" in warnings.check(_rec(1, 10, **few))
    assert warnings.check(_rec(2, 20, **few)) is None  # a partial collapse: once per run
    assert "collapse to one prototype" in warnings.check(_rec(3, 30, prototypes_used=1))


def test_in_training_collapse_warnings_wait_for_the_end_of_the_lr_warm_up():
    cfg = build_config("smoke", ["optim.epochs=60", "optim.warmup_epochs=6.7"])
    warnings = CollapseWarnings(cfg)
    low_rank = {"feature_rank": 2.0}
    assert warnings.check(_rec(2, 30, **low_rank)) is None  # epoch 2 of a 6.7-epoch warm-up: still forming
    assert warnings.check(_rec(6, 90, **low_rank)) is None
    assert "span few directions" in warnings.check(_rec(7, 100, **low_rank))  # after the warm-up it is said
    assert "span few directions" in collapse_warning(_rec(2, 30, **low_rank), cfg)  # the end-of-run check is not gated
