"""make_dataloader + set_data_epoch: the sampler is the epoch's one source; new crops every epoch,
masks start at mask.start_epoch."""

import pytest
import torch

from ibot.builders.data import make_dataloader, set_data_epoch
from ibot.config import build_config


def test_set_data_epoch_changes_crops_and_starts_masks():
    cfg = build_config("smoke", ["mask.start_epoch=1", "optim.epochs=3"])
    loader = make_dataloader(cfg, num_workers=0, shuffle=False)
    first = next(iter(loader))
    again = next(iter(loader))
    torch.testing.assert_close(first.global_crops, again.global_crops)  # same epoch, same crops
    assert not first.masks.masks.any()  # epoch 0 < mask.start_epoch
    set_data_epoch(loader, 1)
    assert loader.sampler.epoch == 1
    second = next(iter(loader))
    assert not torch.allclose(first.global_crops, second.global_crops)
    assert second.masks.masks.any()


def test_set_data_epoch_refuses_a_loader_without_an_epoch_sampler():
    cfg = build_config("smoke")
    plain = make_dataloader(cfg, num_workers=0)
    loader = torch.utils.data.DataLoader(plain.dataset, collate_fn=plain.collate_fn, shuffle=True)
    with pytest.raises(ValueError, match="set_epoch"):
        set_data_epoch(loader, 1)
