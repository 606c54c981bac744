"""Bad config values: one line naming the key, the value and the allowed range, before any work."""

import pytest

from ibot.config import ConfigError, build_config

BAD_VALUES = [
    # (override, text the one-line error must hold)
    ("mask.ratio=[0,1.5]", "mask.ratio=[0.0, 1.5]"),
    ("mask.ratio=[]", "mask.ratio=[]"),
    ("mask.ratio_var=[-0.1]", "mask.ratio_var=[-0.1]"),
    ("mask.ratio=[0.2] mask.ratio_var=[0.3]", "lower mask.ratio_var"),
    ("mask.min_patches=0", "mask.min_patches=0"),
    ("data.local_crop_size=0", "data.local_crop_size=0"),
    ("data.local_crops_number=-1", "data.local_crops_number=-1"),
    ("data.global_crops_scale=[0.9,0.1]", "data.global_crops_scale=[0.9, 0.1]"),
    ("data.global_crops_scale=[0,1]", "0 < min <= max <= 1"),
    ("data.local_crops_scale=[0.1]", "data.local_crops_scale=[0.1]"),
    ("data.num_workers=-2", "data.num_workers=-2"),
    ("data.max_skip_fraction=2", "data.max_skip_fraction=2.0"),
    ("data.dataset=imagenet", "data.dataset='imagenet'"),
    ("model.patch_size=0", "model.patch_size=0"),
    ("model.img_size=0", "model.img_size=0"),
    ("model.arch=vit_nonexistent_patch16", "model.arch='vit_nonexistent_patch16'"),
    ("model.arch=hf-hub:timm/vit_small_patch16_224", "a plain timm model name"),
    ("model.in_chans=2", "model.in_chans=2"),
    ("model.embed_dim=31", "not divisible by model.num_heads"),
    ("model.drop_path=1", "model.drop_path=1.0"),
    ("model.head_act=tanh", "model.head_act='tanh'"),
    ("model.out_dim=0", "model.out_dim=0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0"),
    ("optim.lr=-1", "optim.lr=-1.0"),
    ("optim.lr=0", "optim.lr=0.0"),
    ("optim.momentum_teacher=2", "optim.momentum_teacher=2.0"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]"),
    ("optim.batch_size=0", "optim.batch_size=0"),
    ("optim.epochs=0", "optim.epochs=0"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1"),
    ("loss.student_temp=0", "loss.student_temp=0.0"),
    ("loss.teacher_temp=-0.04", "loss.teacher_temp=-0.04"),
    ("loss.center_momentum=1.5", "loss.center_momentum=1.5"),
    ("loss.lambda2=-1", "loss.lambda2=-1.0"),
    ("loss.lambda1=0 loss.lambda2=0", "nothing to train"),
    ("loss.sinkhorn_iterations=0", "loss.sinkhorn_iterations=0"),
    ("run.log_every=0", "run.log_every=0"),
    ("run.knn_k=0", "run.knn_k=0"),
    ("run.knn_temperature=0", "run.knn_temperature=0.0"),
    ("run.max_bad_steps=0", "run.max_bad_steps=0"),
    ("run.save_every_minutes=-5", "run.save_every_minutes=-5.0"),
    ("run.device=gpu", "run.device='gpu'"),
    ("run.precision=fp8", "run.precision='fp8'"),
]


@pytest.mark.parametrize("override,needle", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_one_line_before_any_work(override, needle, cli, tmp_path):
    line = cli.fails(
        "pretrain",
        *cli.SMOKE,
        "run.max_steps=1",
        f"run.output_dir={tmp_path / 'run'}",
        *override.split(),
        needles=[needle],
    )
    assert "allowed" in line or "divisible" in line or "lower" in line or "nothing" in line or "one of" in line
    assert not (tmp_path / "run").exists()  # nothing was created


def test_several_bad_values_are_listed_on_one_line(cli, tmp_path):
    line = cli.fails("config", "preset=smoke", "optim.lr=-1", "run.log_every=0", needles=["optim.lr", "run.log_every"])
    assert line.count("allowed") == 2


def test_output_dir_that_is_a_file(cli, tmp_path):
    (tmp_path / "taken").write_text("a file")
    cli.fails(
        "pretrain", "preset=smoke", f"run.output_dir={tmp_path / 'taken'}", needles=["run.output_dir", "a folder"]
    )
    assert (tmp_path / "taken").read_text() == "a file"


def test_debug_shows_the_traceback(capsys):
    from ibot.cli import main

    with pytest.raises(ConfigError, match="optim.lr"):
        main(["--debug", "config", "preset=smoke", "optim.lr=-1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        main(["config", "preset=smoke", "optim.lr=-1", "--debug"])


def test_every_preset_is_in_range():
    from ibot.config import PRESETS

    for name in PRESETS:
        build_config(name)


def test_usage_errors_are_one_line(cli):
    code, _, err = cli("knn", "runs/x", "--ks", "ten")
    assert code == 2 and err.strip().count("\n") == 0 and "--ks" in err and "--help" in err
    for flag, value in [("--val-fraction", "1.5"), ("--epochs", "0"), ("--n-last-blocks", "-1")]:
        code, _, err = cli("linear", "runs/x", flag, value)
        assert code == 2 and err.strip().count("\n") == 0 and flag in err and value in err
    code, _, err = cli("viz", "attention", "runs/x", "--n", "0")
    assert code == 2 and err.strip().count("\n") == 0 and "--n: 0 is not an integer >= 1" in err
    code, _, err = cli("pretrain", "--no-such-flag")
    assert code == 2 and err.strip().count("\n") == 0 and "--no-such-flag" in err
