"""Fine-tuning hyperparameters fitted to the training-set size (issue 24): the size rules, the schedule
of a small set, overrides, and a small set that learns with the fitted recipe but not with ImageNet's."""

import math

import pytest
import torch

from ibot.data.datasets import TensorImageDataset
from ibot.eval.finetune import FINETUNE_PRESETS, MIN_STEPS, fit_recipe, regularisers_for
from ibot.models.backbone import MaskedViT, create_vit


@pytest.mark.parametrize(
    ("n_train", "mixup", "cutmix"),
    [
        (540, 0.0, 0.0),  # a small folder: off
        (4_999, 0.0, 0.0),
        (5_000, 0.2, 0.0),  # Fashion-MNIST / CIFAR scale: light mixup, no cutmix
        (60_000, 0.2, 0.0),
        (499_999, 0.2, 0.0),
        (500_000, 0.8, 1.0),  # ImageNet scale: the official values
        (1_281_167, 0.8, 1.0),
    ],
)
def test_mixup_and_cutmix_follow_the_training_set_size(n_train, mixup, cutmix):
    assert regularisers_for(n_train) == {"mixup": mixup, "cutmix": cutmix, "smoothing": 0.1}


def test_a_small_set_gets_a_small_batch_enough_steps_and_a_short_warmup():
    hp, why = fit_recipe(540)  # the reported folder: 600 images, 10% held out
    assert hp["batch_size"] == 32 and hp["steps_per_epoch"] == 540 // 32  # was 128: 4 steps per epoch
    assert hp["epochs"] * hp["steps_per_epoch"] >= MIN_STEPS  # was 3 epochs: 12 steps
    assert hp["warmup_epochs"] <= hp["epochs"] / 5
    assert hp["lr"] == pytest.approx(4e-3 * 32 / 128)  # per-image lr of the preset's batch
    assert (hp["mixup"], hp["cutmix"], hp["smoothing"]) == (0.0, 0.0, 0.1)
    assert why.startswith("batch 32 (~1/16 of 540 images") and "(>= 300 steps)" in why
    assert why.endswith("mixup off, cutmix off, smoothing 0.1: 540 training images")
    assert fit_recipe(10)[0]["batch_size"] == 16  # never under 16 images (the whole set when smaller)
    with pytest.raises(ValueError, match="at least one training image"):
        fit_recipe(0)


def test_imagenet_scale_keeps_the_official_recipe_and_overrides_win():
    hp, _ = fit_recipe(1_281_167, "vit_small")
    official = FINETUNE_PRESETS["vit_small"]
    assert (hp["batch_size"], hp["lr"], hp["mixup"], hp["cutmix"], hp["smoothing"]) == (128, 4e-3, 0.8, 1.0, 0.1)
    assert (hp["epochs"], hp["warmup_epochs"]) == (official["epochs"], official["warmup_epochs"])
    old = dict(mixup=0.8, cutmix=1.0, smoothing=0.0, batch_size=128, epochs=3, lr=4e-3)
    hp, why = fit_recipe(540, **old, drop_path=None)  # None: not given
    assert {k: hp[k] for k in old} == old and hp["drop_path"] == FINETUNE_PRESETS["tiny_cpu"]["drop_path"]
    assert why.startswith("batch 128, 3 epochs x 4 steps") and "mixup 0.8, cutmix 1, smoothing off" in why


def _stripes(n: int, seed: int) -> TensorImageDataset:
    """Horizontal (class 0) or vertical (class 1) stripes of random phase plus noise: trivially separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    wave = torch.sin(torch.arange(32).float().view(1, 32) * 1.2 + torch.rand(n, 1, generator=g) * 6.28)  # (n, 32)
    img = torch.where(y.view(-1, 1, 1) == 0, wave.view(n, 1, 32), wave.view(n, 32, 1)).expand(n, 32, 32)
    img = (128 + 90 * img + 20 * torch.randn(n, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)
    return TensorImageDataset(img.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), y, ["horizontal", "vertical"])


@pytest.fixture
def one_thread():
    """300 steps of a 2-block ViT: ~7 s on one thread; two threads on a busy 2-core machine took 25x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_small_set_learns_with_the_fitted_recipe_and_not_with_imagenet_defaults(one_thread):
    from ibot.eval.finetune import finetune

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)
    backbone = MaskedViT(vit)
    train, test = _stripes(64, 0), _stripes(64, 1)

    def run(**kw):
        logs = []
        res = finetune(backbone, train, test, num_classes=2, image_size=32, log=logs.append, **kw)
        return res, float(logs[-1].rsplit("loss ", 1)[1])

    imagenet = dict(mixup=0.8, cutmix=1.0, batch_size=128, epochs=3, lr=4e-3)  # the old tiny_cpu recipe
    res, loss = run(**imagenet)
    assert res["test_top1"] <= 65 and loss > math.log(2)  # measured: 50% (one class for all), loss 1.80
    res, loss = run()  # fitted: batch 16, 75 epochs x 4 steps, mixup and cutmix off
    assert res["recipe"] == "mixup off, cutmix off, smoothing 0.1: 64 training images"
    assert res["test_top1"] >= 90 and loss < 0.5 * math.log(2)  # measured: 100%, loss 0.20 (smoothing's floor)
