"""The three examples (plain PyTorch, Lightning, Lightning + DDP) run on the CPU and advance the epochs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_pytorch_example_needs_no_lightning_and_advances_epochs(capsys):
    source = (ROOT / "examples" / "pytorch_ibot.py").read_text()
    assert "lightning" not in source.replace("no Lightning", "")
    model, loader = _load("pytorch_ibot").main(["--epochs", "2"])
    assert "epoch 1: loss" in capsys.readouterr().out
    assert loader.sampler.epoch == 1  # the one epoch source; the model holds none: Schedules gives temperatures


def test_lightning_example_schedules_from_trainer_monitors_and_knn(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    trainer, module = _load("lightning_ibot").main(["optim.epochs=2", "run.knn_at_end=false"])
    assert module.niter == 4  # 64 synthetic images / batch 16, read from the trainer
    assert len(module.schedules) == 8 and module.schedules[3].lr == pytest.approx(1e-3 * 16 / 256)
    loader = trainer.train_dataloader
    assert loader.sampler.epoch == 1  # Lightning's set_epoch reached the epoch sampler (bug: stayed at 0)
    metrics = trainer.callback_metrics
    for key in ("monitor/teacher_entropy", "monitor/feature_rank", "schedule/lr", "loss/patch", "knn/top1"):
        assert key in metrics, key
    knn = trainer.callbacks[0].results
    assert [r["epoch"] for r in knn] == [1, 2] and knn[0]["k"] == 5


def test_lightning_docstring_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    import ibot.lightning

    monkeypatch.chdir(tmp_path)
    lines = ibot.lightning.__doc__.split("\n\n")[1].splitlines()
    code = "\n".join(line[4:] for line in lines)
    assert "iBOTLightningModule(cfg)" in code
    code = code.replace("lightning.Trainer(", "lightning.Trainer(logger=False, enable_progress_bar=False, ")
    exec(code, {})


def test_lightning_ddp_example_two_processes():
    pytest.importorskip("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lightning_ddp_ibot.py"), "optim.epochs=1", "run.knn_at_end=false"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "steps/epoch 2" in res.stdout  # 64 images / (16 per process x 2 processes)
    assert "final loss" in res.stdout
