"""Experiment trackers behind one small interface: TensorBoard, CSV, Weights & Biases.

A logger receives the records the trainer writes to ``metrics.jsonl`` (one dict per logged step,
plus k-NN records) and mirrors them. ``run.loggers`` picks them: ``[tensorboard]`` by default,
``run.loggers=[tensorboard,csv,wandb]`` for all three. Every logger is told the step training
restarts from, so a resumed or ``--fresh`` run never shows a step twice.

Metric names are grouped the same way everywhere (``loss/cls``, ``schedule/lr``,
``monitor/feature_rank``, ``knn/top1`` ...); constants (``feature_dim``, ``teacher_entropy_max``)
and bookkeeping (``time``, ``epoch``) are not sent to trackers.
"""

from __future__ import annotations

import csv
import math
import secrets
from pathlib import Path
from typing import Protocol

LOGGERS = ("tensorboard", "csv", "wandb")

GROUPS = {
    "loss": "loss/total",
    "loss_cls": "loss/cls",
    "loss_patch": "loss/patch",
    "loss_koleo": "loss/koleo",
    "lr": "schedule/lr",
    "wd": "schedule/weight_decay",
    "momentum": "schedule/teacher_momentum",
    "teacher_temp": "schedule/teacher_temp",
    "teacher_patch_temp": "schedule/teacher_patch_temp",
    "teacher_entropy": "monitor/teacher_entropy",
    "prototypes_used": "monitor/prototypes_used",
    "prototypes_used_frac": "monitor/prototypes_used_frac",
    "center_norm": "monitor/center_norm",
    "view_agreement": "monitor/view_agreement",
    "feature_rank": "monitor/feature_rank",
    "images_per_s": "throughput/images_per_s",
    "skipped_images": "throughput/skipped_images",
    "knn_top1": "knn/top1",
    "knn_top5": "knn/top5",
    "knn_untrained_top1": "knn/untrained_top1",  # the final k-NN's baselines (ibot.eval.baselines)
    "knn_pixels_top1": "knn/pixels_top1",
}
NOT_TRACKED = ("step", "epoch", "time", "feature_dim", "teacher_entropy_max", "prototypes_possible")


def tracked_scalars(record: dict) -> dict[str, float]:
    """``{group/name: value}`` of a record's finite numbers, without constants and bookkeeping."""
    out = {}
    for k, v in record.items():
        if k in NOT_TRACKED or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[GROUPS.get(k, f"other/{k}")] = float(v)
    return out


class Logger(Protocol):
    """What the trainer calls: ``log`` per record (with its step), ``close`` at the end."""

    def log(self, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Grouped scalars under ``RUN/tb``; events at or after the restart step are purged on resume."""

    def __init__(self, run_dir: str | Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)

    def log(self, record: dict, step: int) -> None:
        for tag, v in tracked_scalars(record).items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        self.writer.close()


class CSVLogger:
    """``RUN/metrics.csv``: one row per record, a column per grouped metric (header grows as needed)."""

    def __init__(self, run_dir: str | Path, start_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.columns = ["step"] + sorted({k for r in self.rows for k in r if k != "step"})
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)

    def log(self, record: dict, step: int) -> None:
        row = {"step": step, **tracked_scalars(record)}
        self.rows.append(row)
        if any(k not in self.columns for k in row):
            self.columns += sorted(k for k in row if k not in self.columns)
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def close(self) -> None:
        pass


class WandbLogger:
    """Weights & Biases (``pip install ibot[wandb]``); offline by default (``run.wandb_mode``).

    One W&B run per run folder: its id is kept in ``RUN/wandb_id``, so a resumed run continues it.
    Offline runs are written under ``RUN/wandb`` and uploaded later with ``wandb sync RUN/wandb``.
    """

    def __init__(self, run_dir: str | Path, config: dict, project: str, mode: str, start_step: int = 0) -> None:
        try:
            import wandb
        except ImportError as err:
            from ibot.config import ConfigError

            raise ConfigError("run.loggers has wandb but wandb is not installed: pip install 'ibot[wandb]'") from err
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id"
        if start_step and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id)
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config,
        )
        self.run_id = run_id

    def log(self, record: dict, step: int) -> None:
        self.run.log(tracked_scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def build_loggers(names, run_dir: str | Path, config: dict, start_step: int = 0) -> list[Logger]:
    """The loggers ``run.loggers`` names (the config dict is what W&B records)."""
    run_cfg = config.get("run", {})
    out: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardLogger(run_dir, start_step))
        elif name == "csv":
            out.append(CSVLogger(run_dir, start_step))
        elif name == "wandb":
            project = run_cfg.get("wandb_project", "ibot")
            out.append(WandbLogger(run_dir, config, project, run_cfg.get("wandb_mode", "offline"), start_step))
        else:
            raise ValueError(f"unknown logger {name!r}; run.loggers takes {list(LOGGERS)}")
    return out
