import torch

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
