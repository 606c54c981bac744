import torch

from ibot.train.metrics import rankme


def test_rankme_counts_the_directions_features_use():
    assert abs(rankme(torch.ones(64, 16)) - 1.0) < 0.01  # one direction
    assert abs(rankme(torch.eye(16)) - 16.0) < 0.01  # all directions equally
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(256, 3, generator=gen) @ torch.randn(3, 32, generator=gen)  # rank-3 features
    assert rankme(low) < 3.0 < rankme(torch.randn(256, 32, generator=gen))
