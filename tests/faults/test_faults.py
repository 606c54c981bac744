"""Fault injection: bad images, non-finite losses, collapse, crashes and full disks, bad configs, unsafe files."""

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ibot import io as ckpt_mod
from ibot.config import ConfigError, build_config
from ibot.data.datasets import FileImageDataset, load_image
from ibot.io import CheckpointError, load_safe, save_atomic
from ibot.train.monitors import collapse_monitors, collapse_warning, rankme
from ibot.train.trainer import Trainer, TrainingError


def smoke(tmp_path, *ov):
    return build_config("smoke", [f"run.output_dir={tmp_path}", "run.progress=false", "run.knn_at_end=false", *ov])


def _bad_folder(root):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "a" / "rgb.png")
    Image.new("L", (40, 40), 128).save(root / "a" / "gray.png")
    Image.new("RGBA", (40, 40), (0, 0, 200, 100)).save(root / "b" / "rgba.png")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(root / "b" / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(root / "b" / "deep16.png")
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not png data")
    good = root / "b" / "full.jpg"
    Image.new("RGB", (64, 64), (5, 5, 5)).save(good)
    (root / "b" / "truncated.jpg").write_bytes(good.read_bytes()[:200])


def test_every_image_kind_loads_or_is_skipped_with_reason(tmp_path, caplog):
    _bad_folder(tmp_path)
    ds = FileImageDataset(tmp_path)
    by_name = {p.split("/")[-1]: i for i, (p, _) in enumerate(ds.samples)}
    for ok in ("rgb.png", "gray.png", "rgba.png", "cmyk.jpg", "deep16.png", "full.jpg"):
        img, _ = ds[by_name[ok]]
        assert img.mode in ("RGB", "L"), ok
    assert load_image(tmp_path / "b" / "deep16.png").getextrema()[1] == 255  # 16-bit scaled to 8-bit
    with caplog.at_level("WARNING", logger="ibot"):
        for bad in ("zero.jpg", "corrupt.png", "truncated.jpg"):
            assert ds[by_name[bad]] is None
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 3
    assert any("truncated.jpg" in r.getMessage() for r in caplog.records)


def test_skip_rate_threshold_stops_the_run(tmp_path):
    _bad_folder(tmp_path / "imgs")
    cfg = smoke(
        tmp_path / "run",
        "data.dataset=imagefolder",
        f"data.path={tmp_path / 'imgs'}",
        "optim.batch_size=4",
        "data.max_skip_fraction=0.01",
        "optim.epochs=10",
    )
    tr = Trainer(cfg, log=lambda *a: None)
    tr.cfg.data.max_skip_fraction = 0.01
    tr.skipped_images, tr.attempted_images = 11, 20  # as if many files were bad
    with pytest.raises(TrainingError, match="unreadable images skipped"):
        tr.fit()


def test_non_finite_loss_is_skipped_then_stops_with_advice(tmp_path):
    tr = Trainer(smoke(tmp_path, "run.max_bad_steps=3", "run.save_every_steps=1"), log=lambda *a: None)
    real_step = tr.model.step
    calls = {"n": 0}

    def poisoned(*args, **kw):
        out = real_step(*args, **kw)
        calls["n"] += 1
        if calls["n"] > 2:
            out.loss = out.loss * float("nan")
        return out

    tr.model.step = poisoned
    with pytest.raises(TrainingError, match="lower optim.lr.*beta2"):
        tr.fit()
    ckpt = load_safe(tmp_path / "checkpoint.pth")
    assert ckpt["global_step"] == 2  # the last good step; nothing after it was applied
    teacher_after = {k: v for k, v in tr.model.state_dict().items() if k.startswith("teacher.")}
    for k, v in teacher_after.items():
        torch.testing.assert_close(v, ckpt["model"][k])  # skipped steps did not touch the EMA


def test_collapse_monitors_are_logged_and_warn(tmp_path):
    tr = Trainer(smoke(tmp_path, "run.max_steps=2"), log=lambda *a: None)
    tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    for key in ("teacher_entropy", "prototypes_used", "center_norm", "view_agreement", "feature_rank"):
        assert key in rows[-1]
    assert rows[-1]["feature_dim"] == 32 and rows[-1]["prototypes_used"] >= 1
    # the monitors of one step, recomputed from its output
    with torch.no_grad():
        out = tr.model(batch=next(iter(tr.data.batches(0))), epoch=0)
    mon = collapse_monitors(tr.model, out, 0)
    arg = out.teacher_logits.argmax(-1)  # (G, B)
    assert mon["feature_rank"] == pytest.approx(rankme(out.embedding))  # of the teacher CLS features
    assert mon["prototypes_used"] == len(set(arg.flatten().tolist()))
    assert mon["view_agreement"] == pytest.approx((arg[0] == arg[1]).float().mean().item())
    assert mon["center_norm"] == pytest.approx(tr.model.cls_center.center.norm().item())
    healthy = {"feature_rank": 20.0, "feature_dim": 32}
    collapsed = {"epoch": 2, "teacher_entropy": 0.0, "teacher_entropy_max": 4.0, "prototypes_used": 1, **healthy}
    assert "collapse to one prototype" in collapse_warning(collapsed)
    uniform = {"epoch": 2, "teacher_entropy": 3.99, "teacher_entropy_max": 4.0, "prototypes_used": 30, **healthy}
    assert "uniform" in collapse_warning(uniform)
    few_dims = {**uniform, "teacher_entropy": 2.0, "feature_rank": 2.5}
    assert "dimensional collapse" in collapse_warning(few_dims)
    assert collapse_warning({**few_dims, "feature_rank": 20.0}) is None


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"v": torch.ones(3)}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left.*previous checkpoint is kept"):
        save_atomic({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    torch.testing.assert_close(load_safe(path)["v"], torch.ones(3))
    assert not list(tmp_path.glob(".*.tmp"))


def test_torn_file_is_reported_not_loaded(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_safe(tmp_path / "checkpoint.pth")


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.warmup_teacher_temp_epochs=-1", "warmup_teacher_temp_epochs"),
        ("mask.start_epoch=-2", "mask.start_epoch"),
        ("model.patch_size=5", "not divisible"),
        ("data.local_crop_size=12", "local_crop_size"),
        ("mask.shape=grid", "mask.shape"),
        ("loss.centering=softmax", "loss.centering"),
        ("data.global_crops_number=0", "global_crops_number=0"),
    ],
)
def test_impossible_configs_fail_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("smoke", [override])


class Evil:
    def __reduce__(self):
        return (exec, ("import os",))


def test_unsafe_checkpoint_refused_and_opt_in(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="--allow-unsafe-pickle"):
        load_safe(tmp_path / "evil.pth")
    assert "x" in load_safe(tmp_path / "evil.pth", allow_unsafe=True)
