"""Metric sinks of a run: JSONL file, TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def rankme(features: torch.Tensor) -> float:
    """Effective rank of (N, D) features: ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (RankMe,
    Garrido et al. 2023), between 1 (every row the same direction) and ``min(N, D)``. A value far
    below the width means dimensional collapse, which hurts k-NN even when the head looks healthy."""
    import torch

    s = torch.linalg.svdvals(features.float())
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return math.inf  # a torn last line of a killed run: dropped


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resumed run redoes them); returns how many."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if _step_of(ln) <= step]
        if len(keep) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(self.path)
        return len(lines) - len(keep)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Loss terms, lr, teacher temperature and momentum of a run as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        return None
    out = Path(out) if out else Path(run_dir) / "curves.png"
    panels = [
        ("loss", ["loss", "loss_cls", "loss_patch"]),
        ("lr", ["lr"]),
        ("teacher", ["teacher_temp", "momentum"]),
        ("collapse monitors", ["teacher_entropy", "prototypes_used_frac"]),
        ("feature rank (RankMe)", ["feature_rank"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for k in keys:
            ys = [r.get(k) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
