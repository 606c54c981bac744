"""Broken, foreign and unwritable checkpoints: one line, never unsafe advice, the last good state kept."""

import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from ibot import io as ckpt_mod
from ibot.io import load_safe, previous_path, verify_checksum


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A smoke run stopped at step 3: checkpoint.pth (step 3) and checkpoint.prev.pth (step 2)."""
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    run = tmp_path_factory.mktemp("base") / "run"
    ov = [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false"]
    Trainer(build_config("smoke", [*ov, "run.save_every_steps=2", "run.max_steps=3"]), log=lambda *a: None).fit()
    return run


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _flip(path, offset=2000, n=64):
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(255 - b for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def _resume(cli, run, *ov):
    return cli("pretrain", "--resume", run, "run.progress=false", "run.knn_at_end=false", *ov)


def test_two_checkpoints_are_kept_with_checksums(run):
    assert load_safe(run / "checkpoint.pth")["global_step"] == 3
    assert load_safe(previous_path(run / "checkpoint.pth"))["global_step"] == 2
    assert verify_checksum(run / "checkpoint.pth") is True
    assert torch.load(run / "checkpoint.pth", weights_only=True)["global_step"] == 3  # still a plain torch file


def test_overwritten_bytes_are_detected_not_loaded(run, cli):
    _flip(run / "checkpoint.pth")
    assert verify_checksum(run / "checkpoint.pth") is False
    cli.fails("knn", run, "--ks", "5", needles=["corrupt", "checkpoint.prev.pth"])
    cli.fails("export", run, "--out", run.parent / "exp", needles=["corrupt"])
    assert not (run.parent / "exp").exists()


def test_corrupt_checkpoint_falls_back_to_the_previous(run, cli):
    _flip(run / "checkpoint.pth")
    code, out, _ = _resume(cli, run, "run.max_steps=4")
    assert code == 0
    assert "corrupt" in out and "previous checkpoint" in out
    assert load_safe(run / "checkpoint.pth")["global_step"] == 4  # 2 (previous) + 2 steps
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the lost step 3 was dropped from the log and redone once


def test_truncated_checkpoint_falls_back_to_the_previous(run, cli):
    data = (run / "checkpoint.pth").read_bytes()
    (run / "checkpoint.pth").write_bytes(data[: len(data) // 2])
    cli.fails("knn", run, needles=["not a readable checkpoint", "truncated"])
    code, out, _ = _resume(cli, run, "run.max_steps=3")
    assert code == 0 and "previous checkpoint" in out
    assert load_safe(run / "checkpoint.pth")["global_step"] == 3


def test_missing_newest_after_a_kill_between_renames(run, cli):
    (run / "checkpoint.pth").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')  # torn by the kill
    code, out, _ = cli("pretrain", *cli.SMOKE, f"run.output_dir={run}", "run.max_steps=3")
    assert code == 0 and "is missing" in out
    assert load_safe(run / "checkpoint.pth")["global_step"] == 3
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_random_bytes_never_steer_to_unsafe_loading(tmp_path, cli):
    bad = tmp_path / "random.pth"
    bad.write_bytes(os.urandom(4096))
    line = cli.fails("knn", bad, needles=["not a PyTorch checkpoint"])
    assert "unsafe" not in line
    line = cli.fails("pretrain", "--resume", bad, needles=["not a PyTorch checkpoint"])
    assert "unsafe" not in line
    zipped = tmp_path / "zip.pth"  # a zip header, then garbage: torch's own "weights only" error
    zipped.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    assert "unsafe" not in cli.fails("knn", zipped, needles=["not a readable checkpoint"])
    (tmp_path / "empty.pth").write_bytes(b"")
    cli.fails("knn", tmp_path / "empty.pth", needles=["not a PyTorch checkpoint"])


def test_foreign_pth_given_to_resume(tmp_path, cli):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "other.pth")
    cli.fails("pretrain", "--resume", tmp_path / "other.pth", needles=["not an ibot training checkpoint", "init_from"])
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cli.fails("pretrain", "--resume", tmp_path / "list.pth", needles=["not an ibot training checkpoint"])


def test_checkpoint_missing_keys(run, cli):
    for key in ("optimizer", "rng"):
        ckpt = load_safe(run / "checkpoint.pth")
        del ckpt[key]
        path = run.parent / f"no_{key}.pth"
        torch.save(ckpt, path)
        cli.fails("pretrain", "--resume", path, needles=[f"lacks {key}"])


def test_checkpoint_of_a_newer_version_with_unknown_config_keys(run, cli, caplog):
    """Issue 25 item 13: evaluation loads it with one warning line naming the ignored keys (it used to
    print an omegaconf ConfigKeyError traceback); resuming refuses in one line (see resumable_config)."""
    ckpt = load_safe(run / "checkpoint.pth")
    ckpt["config"]["model"]["future_option"] = 3
    ckpt["config"]["future_section"] = {"x": 1}
    path = run.parent / "newer.pth"
    torch.save(ckpt, path)
    with caplog.at_level("WARNING", logger="ibot"):
        code, out, err = cli("knn", path, "--ks", "5")  # (the cli fixture fails on any traceback)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert warned == [
        "warning: ignoring checkpoint config keys this ibot version does not know: future_section.x, "
        "model.future_option"
    ], err
    assert "top-1" in out
    needles = ["newer ibot", "future_section.x, model.future_option", "run.init_from"]
    cli.fails("pretrain", "--resume", path, needles=needles)


def test_checkpoint_path_is_a_folder(tmp_path, cli):
    (tmp_path / "d.pth").mkdir()
    cli.fails("knn", tmp_path / "d.pth", needles=["has no checkpoint.pth"])


def _full_disk(obj, f, *a, **k):  # what torch.save really raises when the device fills up
    f.write(b"partial data")
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1088 vs 1024")


def test_full_disk_runtime_error_keeps_the_previous_checkpoint(run, cli, monkeypatch):
    monkeypatch.setattr(ckpt_mod.torch, "save", _full_disk)
    line = cli.fails("pretrain", "--resume", run, "run.progress=false", "run.max_steps=4", needles=["disk full"])
    assert "previous checkpoint is kept" in line
    monkeypatch.undo()
    assert load_safe(run / "checkpoint.pth")["global_step"] == 3
    assert load_safe(previous_path(run / "checkpoint.pth"))["global_step"] == 2
    assert not list(run.glob(".*.tmp"))


def test_unrelated_runtime_error_in_save_is_a_bug_not_a_disk_problem(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("some bug")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken)
    with pytest.raises(RuntimeError, match="some bug"):
        ckpt_mod.save_atomic({"x": 1}, tmp_path / "c.pth")
    assert not list(tmp_path.iterdir())


def test_folder_turning_read_only_mid_run(run, cli, monkeypatch):
    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", read_only)
    cli.fails("pretrain", "--resume", run, "run.progress=false", "run.max_steps=4", needles=["Permission denied"])
    monkeypatch.undo()
    assert load_safe(run / "checkpoint.pth")["global_step"] == 3


def test_output_dir_under_a_file(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    cli.fails("pretrain", *cli.SMOKE, f"run.output_dir={tmp_path / 'file' / 'run'}", needles=["not writable"])


def _mount_tmpfs(path, options):
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")


def test_real_full_disk(base_run, tmp_path, cli):
    size = (base_run / "checkpoint.pth").stat().st_size
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, f"size={int(size * 2.5)}")
    try:
        run = mnt / "run"
        run.mkdir()
        shutil.copy(base_run / "checkpoint.pth", run / "checkpoint.pth")
        shutil.copy(previous_path(base_run / "checkpoint.pth"), previous_path(run / "checkpoint.pth"))
        line = cli.fails("pretrain", "--resume", run, "run.progress=false", "run.max_steps=4", needles=["previous"])
        assert "could not write checkpoint" in line
        assert load_safe(run / "checkpoint.pth")["global_step"] == 3
        assert not list(run.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_read_only_folder(base_run, tmp_path, cli):
    mnt = tmp_path / "ro"
    if os.geteuid() != 0:
        mnt.mkdir()
        os.chmod(mnt, 0o555)
    else:
        _mount_tmpfs(mnt, "ro,size=1m")
    try:
        cli.fails("pretrain", *cli.SMOKE, f"run.output_dir={mnt / 'run'}", needles=["not writable"])
        cli.fails("pretrain", *cli.SMOKE, f"run.output_dir={mnt}", needles=["not writable"])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mnt)], check=False)
        else:
            os.chmod(mnt, 0o755)


def test_changing_norm_last_layer_on_resume(run, cli):
    cli.fails("pretrain", "--resume", run, "model.norm_last_layer=false", needles=["model.norm_last_layer"])
    assert load_safe(run / "checkpoint.pth")["global_step"] == 3


@pytest.mark.parametrize("batch", [32, 4])
def test_resume_mid_epoch_with_another_batch_size(run, cli, batch):
    # stopped at step 3 of 4 with batch 16 (48 of 64 images): batch 32 resumes at step 1 of 2, batch 4 at 12 of 16
    code, _, err = _resume(cli, run, f"optim.batch_size={batch}", "run.max_steps=1000")
    assert code == 2 and "run.allow_schedule_change=true" in err and "checkpoint.pth was" in err  # no fallback
    extend = "run.allow_schedule_change=true"  # a new batch size rescales the lr: said explicitly
    code, _, err = _resume(cli, run, f"optim.batch_size={batch}", "run.max_steps=1000", extend)
    assert code == 0, err
    ckpt = load_safe(run / "checkpoint.pth")
    steps_left_in_epoch0 = 64 // batch - 48 // batch
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (2, 0)
    assert ckpt["global_step"] == 3 + steps_left_in_epoch0 + 64 // batch
