"""Everyday CLI mistakes: one line with the fix; a real bug keeps its traceback."""

import os

import pytest
import torch

import ibot.cli


def test_resume_without_a_checkpoint(tmp_path, cli):
    cli.fails("pretrain", "--resume", tmp_path, needles=["no checkpoint", "without --resume"])


def test_init_from_missing_or_corrupt(tmp_path, cli):
    cli.fails(
        "pretrain",
        *cli.SMOKE,
        f"run.output_dir={tmp_path / 'a'}",
        "run.init_from=/no/such.pth",
        needles=["does not exist"],
    )
    (tmp_path / "rnd.pth").write_bytes(os.urandom(512))
    line = cli.fails(
        "pretrain",
        *cli.SMOKE,
        f"run.output_dir={tmp_path / 'b'}",
        f"run.init_from={tmp_path / 'rnd.pth'}",
        needles=["not a PyTorch"],
    )
    assert "unsafe" not in line


def test_dataset_smaller_than_a_batch(tmp_path, cli):
    cli.fails(
        "pretrain", *cli.SMOKE, f"run.output_dir={tmp_path}", "data.synthetic_size=8", needles=["fewer than one batch"]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, cli):
    cli.fails("pretrain", *cli.SMOKE, f"run.output_dir={tmp_path}", "run.device=cuda", needles=["run.device=cpu"])


def test_unknown_preset_and_key(cli):
    cli.fails("config", "preset=smok", needles=["did you mean 'smoke'"])
    cli.fails("config", "preset=smoke", "optim.lrr=1", needles=["did you mean optim.lr"])
    cli.fails("config", "preset=smoke", "optim.lr", needles=["not key=value"])


def test_os_error_is_one_line(tmp_path, cli, monkeypatch):
    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.png"))

    monkeypatch.setattr(ibot.cli, "cmd_config", denied)
    cli.fails("config", needles=["Permission denied", "x.png"])


def test_a_real_bug_keeps_its_traceback(capsys, monkeypatch):
    def bug(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(ibot.cli, "cmd_config", bug)
    assert ibot.cli.main(["config"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: unsupported operand" in err
    assert err.strip().splitlines()[-1].startswith("ibot: internal error (TypeError); this is a bug")
