"""The three examples (plain PyTorch, Lightning, Lightning + DDP) run on the CPU on the smoke preset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["pytorch_ibot.py", "lightning_ibot.py", "lightning_ddp_ibot.py"])
def test_example_runs(script):
    pytest.importorskip("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "optim.epochs=1", "run.knn_at_end=false"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loss" in res.stdout
