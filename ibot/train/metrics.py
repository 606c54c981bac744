"""Metric sinks of a run: JSONL file, TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and passes it to the loggers.

    Every line with a step after ``start_step`` is dropped first (in ``metrics.jsonl`` and
    ``knn.jsonl``): they come from a run that went further before it was resumed, or from the
    run a ``--fresh`` start replaces, so each step appears once.

    Args:
        run_dir: the run folder.
        loggers: :mod:`ibot.train.loggers` instances (TensorBoard, CSV, W&B).
        start_step: the global step training starts from (0 for a new run).
    """

    def __init__(self, run_dir: str | Path, loggers: list | None = None, start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.loggers = list(loggers or [])
        for name in ("metrics.jsonl", "knn.jsonl"):
            truncate_jsonl(self.run_dir / name, start_step)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.log(record, record.get("step", 0))

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf  # a line torn by a kill: dropped


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of a JSONL file whose ``step`` is at most ``last_step`` and drop a torn last line
    (a missing file stays missing). Rewritten atomically."""
    if not path.is_file():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    kept = [x for x in lines if _step_of(x) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CURVE_PANELS = (
    ("loss", ("loss", "loss_cls", "loss_patch", "loss_koleo"), False),
    ("learning rate", ("lr",), True),
    ("weight decay", ("wd",), False),
    ("teacher temperature", ("teacher_temp", "teacher_patch_temp"), False),
    ("teacher momentum", ("momentum",), False),
    ("teacher entropy (dashed: uniform)", ("teacher_entropy",), False),
    ("prototypes used (fraction)", ("prototypes_used_frac",), False),
    ("feature rank (RankMe; dashed: width)", ("feature_rank",), False),
    ("k-NN top-1 (%)", ("knn_top1",), False),
)


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """The run's curves as one PNG, one axis per quantity (values of different scales never share one).

    Loss terms, lr (log scale), weight decay, teacher temperatures, teacher momentum, the collapse
    monitors and the k-NN top-1 (markers at the evaluated steps; also marked on the loss axis).
    Panels without data are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    rows = [r for r in records if "loss" in r]
    if not rows:
        return None
    knn = [r for r in records if "knn_top1" in r]
    out = Path(out) if out else Path(run_dir) / "curves.png"
    panels = _panels(records)
    lo, hi = min(r["step"] for r in rows + knn), max(r["step"] for r in rows + knn)
    pad = max(0.5, 0.02 * (hi - lo))
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.0 * nrows), squeeze=False)
    for ax, (title, keys, log) in zip(axes.flat, panels, strict=False):
        for k in keys:
            src = knn if k == "knn_top1" else rows
            pts = [(r["step"], r[k]) for r in src if r.get(k) is not None]
            ax.plot(*zip(*pts, strict=True), label=k, marker="o" if k == "knn_top1" else None, ms=4)
        if title.startswith("loss"):
            for r in knn:
                ax.axvline(r["step"], color="grey", lw=0.6, ls=":")
        if "teacher_entropy" in keys and "teacher_entropy_max" in rows[-1]:
            ax.axhline(rows[-1]["teacher_entropy_max"], color="grey", ls="--", lw=0.8)
        if "feature_rank" in keys and "feature_dim" in rows[-1]:
            ax.axhline(rows[-1]["feature_dim"], color="grey", ls="--", lw=0.8)
        if log and all(r.get(keys[0], 0) > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_xlim(lo - pad, hi + pad)  # one step axis for every panel (k-NN included)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _panels(records: list[dict]) -> list[tuple[str, list[str], bool]]:
    panels = [(t, [k for k in keys if any(k in r for r in records)], log) for t, keys, log in CURVE_PANELS]
    return [p for p in panels if p[1]]


def curve_panels(run_dir: str | Path) -> list[tuple[str, list[str]]]:
    """(title, keys) of each axis :func:`plot_curves` draws for a run: what the PNG shows."""
    return [(t, keys) for t, keys, _ in _panels(read_metrics(run_dir))]
