"""``TrainingData``: the run's dataset, pipeline and batches (ibot/train/data.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from ibot.config import build_config
from ibot.data.datasets import DatasetError
from ibot.train.data import TrainingData

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    return build_config("smoke", [f"run.output_dir={tmp_path}", *overrides])


def test_steps_per_epoch_and_pipeline_follow_the_config(tmp_path):
    import torch

    data = TrainingData(_cfg(tmp_path, "data.limit=48"), torch.device("cpu"))
    assert data.niter == 3 and data.pipeline == "tensor"  # 48 images / batch 16; synthetic images are in memory
    assert len(data.bank_set) == 64  # the k-NN bank keeps the whole training split
    batches = list(data.batches(0, start_step=1))
    assert len(batches) == 2 and batches[0].global_crops.shape[0] == 2 * 16
    with pytest.raises(DatasetError, match="fewer than one batch"):
        TrainingData(_cfg(tmp_path, "data.limit=8"), torch.device("cpu"))


def test_a_trainer_alive_at_exit_does_not_hang_the_interpreter(tmp_path):
    """Persistent DataLoader workers of a Trainer still referenced at exit (a notebook, a script's global,
    a failed test's traceback) are stopped by an exit hook; without it the exit hangs."""
    script = (
        "from ibot.config import build_config\n"
        "from ibot.train.trainer import Trainer\n"
        f"cfg = build_config('smoke', ['run.output_dir={tmp_path}', 'data.pipeline=pil', 'data.num_workers=2'])\n"
        "tr = Trainer(cfg, log=lambda *a: None, resume='never')\n"
        "batches = list(tr.data.batches(0))\n"
        "print(len(batches))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "4"
