import pytest

from ibot.config import PRESETS, ConfigError, build_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_with_and_without_local_crops(preset):
    cfg = build_config(preset)
    assert cfg.model.img_size % cfg.model.patch_size == 0
    # turning local crops on (or off) must give a valid config: sizes divisible by the patch
    build_config(preset, ["data.local_crops_number=2"])
    build_config(preset, ["data.local_crops_number=0"])


def test_fmnist_tiny_is_the_tuned_cpu_recipe():
    cfg = build_config("fmnist_tiny")
    assert (cfg.data.dataset, cfg.data.pipeline) == ("fashion_mnist", "tensor")
    assert cfg.data.local_crops_number == 0 and cfg.loss.lambda2 == 2.0 and cfg.loss.koleo_weight == 2.0
    with_local = build_config("fmnist_tiny", ["data.local_crops_number=4"])
    assert with_local.data.local_crop_size == 14  # small local crops for 28-px images, not the 96-px default


def test_augmentation_probabilities_are_checked():
    with pytest.raises(ConfigError, match="color_jitter_p"):
        build_config("smoke", ["data.color_jitter_p=1.5"])
    with pytest.raises(ConfigError, match="solarization_p"):
        build_config("smoke", ["data.solarization_p=-0.1"])


def test_mask_enabled_switch_is_the_official_use_masked_im_modeling():
    """Issue 25 item 12: official ``--use_masked_im_modeling`` defaults to true, so ``loss.lambda2=0`` alone
    is the official ``--lambda2 0`` (the student stays masked); ``mask.enabled=false`` is DINO's inputs."""
    from ibot.builders.data import mask_generator_from_config
    from ibot.builders.model import build_model

    official = build_config("smoke", ["loss.lambda2=0"])  # official --lambda2 0
    assert official.mask.enabled is True  # resolved, so a saved config says what ran
    assert mask_generator_from_config(official) is not None
    model = build_model(official)
    assert model.masked_im_modeling and not model.use_patch_loss
    assert model.student["backbone"].masked_embed is not None
    plain = build_config("smoke", ["loss.lambda2=0", "mask.enabled=false"])  # no patch loss, no masks
    assert mask_generator_from_config(plain) is None and not build_model(plain).masked_im_modeling
    dino = build_config("smoke", ["method=dino"])
    assert dino.mask.enabled is False
    assert mask_generator_from_config(dino) is None and not build_model(dino).masked_im_modeling
    with pytest.raises(ConfigError, match="method=dino never masks"):
        build_config("smoke", ["method=dino", "mask.enabled=true"])
    with pytest.raises(ConfigError, match="needs masked student crops"):
        build_config("smoke", ["mask.enabled=false"])


def test_configs_saved_before_the_masking_default_keep_their_meaning():
    """A checkpoint's config from before item 12 holds ``mask.enabled: null``, which meant masking only
    with a patch loss: it is read so, and its model (no mask token) still loads."""
    from ibot.config import from_dict, to_dict

    old = to_dict(build_config("smoke", ["loss.lambda2=0", "mask.enabled=false"]))
    old["mask"]["enabled"] = None
    assert from_dict(old).mask.enabled is False
    old["loss"]["lambda2"] = 1.0
    assert from_dict(old).mask.enabled is True
    assert from_dict(to_dict(build_config("smoke", ["loss.lambda2=0"]))).mask.enabled is True


def test_teacher_warmup_longer_than_the_run_is_allowed():
    """Bug 8 of issue 15: the official code sizes a numpy array by the epochs; ibot's schedule has no such limit."""
    from ibot.losses.teacher import teacher_temperature

    cfg = build_config("vit_small_in1k", ["optim.epochs=10"])
    assert cfg.loss.warmup_teacher_temp_epochs == 30 and cfg.optim.epochs == 10
    temps = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(10)]
    assert temps[0] == 0.04 and temps[9] == pytest.approx(0.04 + 0.03 * 9 / 29)  # still warming up at the end
    build_config("smoke", ["mask.start_epoch=5", "loss.warmup_teacher_temp_epochs=5"])  # epochs=2: allowed


def test_dataset_names_are_the_ones_data_builds():
    """config validates data.dataset without importing ibot.data: its list must match what data builds."""
    from ibot.config import DATASET_NAMES
    from ibot.data.datasets import DATASETS

    assert DATASET_NAMES == DATASETS
    with pytest.raises(ConfigError, match="data.dataset"):
        build_config("smoke", ["data.dataset=imagenet"])
