import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from ibot.config import ConfigError, build_config
from ibot.data.datasets import DatasetError
from ibot.io import load_safe
from ibot.train.trainer import Trainer


def smoke_cfg(tmp_path, *overrides):
    return build_config(
        "smoke", [f"run.output_dir={tmp_path}", "run.progress=false", "run.knn_at_end=false", *overrides]
    )


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_smoke_run_writes_everything(tmp_path):
    cfg = build_config("smoke", [f"run.output_dir={tmp_path}", "run.progress=false"])
    result = Trainer(cfg, log=lambda *a: None).fit()
    for name in ("checkpoint.pth", "config.json", "metrics.jsonl", "curves.png", "summary.json", "knn.jsonl"):
        assert (tmp_path / name).is_file(), name
    knn = result["knn"]
    assert (knn["k"], knn["n_train"], knn["n_test"]) == (5, 64, 16)
    # 4 balanced classes of stripes: chance is 25%; the teacher's features separate them (9 of 16 right)
    assert knn["top1"] >= 50
    ckpt = load_safe(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 8
    assert ckpt["config"]["model"]["patch_size"] == 8
    assert "cls_center.center" in ckpt["model"] and "optimizer" in ckpt


@pytest.mark.parametrize("k", [3, 4])  # mid-epoch and epoch boundary (4 steps per epoch)
def test_resume_gives_the_same_losses(tmp_path, k):
    full = tmp_path / "full"
    Trainer(smoke_cfg(full, f"run.max_steps={2 * k}"), log=lambda *a: None).fit()
    part = tmp_path / "part"
    Trainer(smoke_cfg(part, f"run.max_steps={k}"), log=lambda *a: None).fit()
    Trainer(smoke_cfg(part, f"run.max_steps={2 * k}"), log=lambda *a: None).fit()  # auto-resume
    a, b = losses(full), losses(part)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 2 * k + 1))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-6)


def test_resume_refuses_incompatible_config(tmp_path):
    Trainer(smoke_cfg(tmp_path, "run.max_steps=1"), log=lambda *a: None).fit()
    from ibot.io import CheckpointError

    with pytest.raises(CheckpointError, match="model.depth"):
        Trainer(smoke_cfg(tmp_path, "model.depth=3"), log=lambda *a: None)


def test_unknown_key_lists_close_matches():
    with pytest.raises(ConfigError, match="did you mean optim.epochs"):
        build_config("smoke", ["optim.epoch=3"])
    with pytest.raises(ConfigError, match="bad value"):
        build_config("smoke", ["optim.epochs=many"])
    with pytest.raises(ConfigError, match="not divisible"):
        build_config("smoke", ["model.img_size=30"])
    with pytest.raises(ConfigError, match="warmup_teacher_temp_epochs"):
        build_config("smoke", ["loss.warmup_teacher_temp_epochs=-1"])


def test_missing_folder_and_tiny_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Trainer(smoke_cfg(tmp_path, "data.dataset=imagefolder", f"data.path={tmp_path}/nope"))
    with pytest.raises(DatasetError, match="fewer than one batch"):
        Trainer(smoke_cfg(tmp_path, "data.synthetic_size=8"))


def _image_folder(root, n=12, corrupt=1):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            color = (200, 30, 30) if c == "a" else (30, 30, 200)
            Image.new("RGB", (40, 40), color).save(root / c / f"{i}.png")
    for i in range(corrupt):
        (root / "a" / f"bad{i}.jpg").write_bytes(b"not a jpeg at all")


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    data = tmp_path / "imgs"
    _image_folder(data)
    cfg = smoke_cfg(
        tmp_path / "run",
        "data.dataset=imagefolder",
        f"data.path={data}",
        "data.holdout=0",  # train on all 13 files (no val/: the default holds 10% out for evaluation)
        "optim.batch_size=13",
        "data.max_skip_fraction=0.5",
        "run.max_steps=2",
    )
    tr = Trainer(cfg, log=lambda *a: None)
    tr.fit()
    assert tr.skipped_images == 2  # one bad file, seen once per epoch
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == 2


def test_cli_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "ibot", "pretrain", "preset=smoke", "optim.epoch=3"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "did you mean optim.epochs" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ibot",
            "pretrain",
            "preset=smoke",
            "data.dataset=imagefolder",
            f"data.path={tmp_path}/missing",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr and out.stderr.strip().count("\n") == 0
    out = subprocess.run([sys.executable, "-m", "ibot", "--help"], capture_output=True, text=True)
    assert "pretrain" in out.stdout and "knn" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ibot", "pretrain", "--help"], capture_output=True, text=True)
    assert "preset" in out.stdout and "--resume" in out.stdout


def test_kill_9_then_resume_continues(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "ibot",
        "pretrain",
        "preset=smoke",
        f"run.output_dir={run}",
        "optim.epochs=50",
        "run.save_every_steps=2",
        "run.progress=false",
        "run.knn_at_end=false",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (
            (run / "checkpoint.pth").exists()
            and (run / "metrics.jsonl").exists()
            and len((run / "metrics.jsonl").read_text().splitlines()) >= 7
        ):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_safe(run / "checkpoint.pth")  # loadable whatever moment the kill hit
    step = ckpt["global_step"]
    assert step >= 2
    out = subprocess.run(
        [sys.executable, "-m", "ibot", "pretrain", "--resume", str(run), f"run.max_steps={step + 2}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert load_safe(run / "checkpoint.pth")["global_step"] == step + 2
    assert not list(run.glob(".checkpoint.pth.*.tmp"))


def test_tensor_and_pil_pipelines_shapes(tmp_path):
    for pipe in ("tensor", "pil"):
        tr = Trainer(smoke_cfg(tmp_path / pipe, f"data.pipeline={pipe}"), log=lambda *a: None)
        b = next(iter(tr.data.batches(0)))
        assert b.global_crops.shape == (32, 3, 32, 32) and b.local_crops.shape == (32, 3, 16, 16)
        assert b.masks.masks.shape == (32, 16)
        assert torch.isfinite(b.global_crops).all()


def test_override_values_parse_lists_bools_and_numbers():
    cfg = build_config(
        "smoke",
        [
            "mask.ratio=[0,0.3]",
            "mask.ratio_var=[0,0.2]",
            "optim.lr=2e-3",
            "model.shared_head=false",
            "model.embed_dim=null",
            "run.output_dir=runs/x",
        ],
    )
    assert list(cfg.mask.ratio) == [0.0, 0.3] and cfg.optim.lr == 2e-3 and cfg.model.shared_head is False
    assert cfg.model.embed_dim is None and cfg.run.output_dir == "runs/x"


def test_a_run_has_one_mask_generator_and_one_teacher_temperature_schedule(tmp_path):
    """Issue 25: the collate and the model each built a MaskGenerator from the config, and Schedules and
    the model each held the teacher-temperature parameters; a run now holds one of each."""
    tr = Trainer(smoke_cfg(tmp_path, "mask.start_epoch=1"), log=lambda *a: None)
    assert tr.data.collate.mask_generator is not None
    assert tr.model.mask_generator is tr.data.collate.mask_generator
    assert tr.schedules.teacher_temps is tr.model.teacher_temps
    assert tr.model.teacher_temps.patch_start_epoch == tr.model.mask_generator.start_epoch == 1
