#!/usr/bin/env python
"""Fashion-MNIST quality benchmark: pretrain for a wall-clock budget, then k-NN top-1.

Protocol (issue 5): pretrain on the 60k training images without labels for ``--budget-min`` minutes
of training time (data loading included, evaluation excluded), then weighted k-NN (k=20, cosine,
exp(sim/0.07)) on the teacher's L2-normalised CLS: the 60k training features are the memory bank,
the 10k test images the queries. ``--split val`` instead uses 50k/10k of the training set (tuning).

The schedule must fit the budget, so a short calibration (not counted) measures the step time;
the run then gets ``E`` epochs of ``N`` images with ``E * N / batch`` steps = budget / step time
(``N`` = 60k when the budget allows a whole number of epochs, else slightly fewer). A hard time
limit stops training at the budget in any case. k-NN is also measured after every epoch, so the
output gives accuracy against training minutes.

    python benchmarks/fmnist_quality.py --preset fmnist_tiny --budget-min 20
    python benchmarks/fmnist_quality.py --preset fmnist_tiny --budget-min 5 --split val --set loss.lambda2=0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibot.config import build_config  # noqa: E402
from ibot.train.trainer import Trainer  # noqa: E402


def calibrate(preset: str, overrides: list[str], steps: int = 6) -> float:
    """Seconds per training step (data included), after one warm-up step."""
    cfg = build_config(
        preset, [*overrides, "run.output_dir=/tmp/ibot-calibrate", "run.progress=false", "run.knn_at_end=false"]
    )
    tr = Trainer(cfg, log=lambda *a: None, resume="never")
    it = iter(tr.data.batches(0))
    tr.train_step(next(it), 0)
    t = time.time()
    for i in range(1, steps + 1):
        tr.train_step(next(it), i)
    return (time.time() - t) / steps


def plan(step_s: float, budget_min: float, batch: int, n_images: int = 60000) -> tuple[int, int]:
    """(epochs, images per epoch) whose steps fill the budget."""
    steps = budget_min * 60 / step_s
    epochs = max(1, round(steps * batch / n_images))
    per_epoch = min(n_images, int(steps / epochs) * batch)
    return epochs, max(per_epoch, batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist_tiny")
    p.add_argument("--budget-min", type=float, default=20.0)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides")
    p.add_argument("--out", default="runs/bench_fmnist", help="run folder")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between intermediate k-NN (0 = end only)")
    p.add_argument("--dataset", default=None, help="override data.dataset (e.g. mnist)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    overrides = list(args.set)
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    step_s = calibrate(args.preset, overrides)
    batch = build_config(args.preset, overrides).optim.batch_size
    epochs, per_epoch = plan(step_s, args.budget_min, batch)
    warm = min(build_config(args.preset, overrides).loss.warmup_teacher_temp_epochs, epochs)
    run_overrides = [
        *overrides,
        f"optim.epochs={epochs}",
        f"data.limit={per_epoch}",
        f"loss.warmup_teacher_temp_epochs={warm}",
        f"run.output_dir={args.out}",
        f"run.time_limit_min={args.budget_min}",
        f"run.knn_every={args.knn_every}",
        f"run.knn_split={args.split}",
        "run.progress=false",
        "run.log_every=50",
    ]
    print(f"calibration: {step_s:.3f} s/step at batch {batch} -> {epochs} epochs x {per_epoch} images", flush=True)
    cfg = build_config(args.preset, run_overrides)
    trainer = Trainer(cfg, resume="never")
    result = trainer.fit()
    rows = [json.loads(x) for x in (Path(args.out) / "knn.jsonl").read_text().splitlines()]
    print("\nminutes  epoch  k-NN top-1 (k=20)")
    for r in rows:
        print(f"{r['train_minutes']:7.2f}  {r['epoch']:5d}  {r['top1']:6.2f}")
    final = result["knn"]
    summary = {
        "preset": args.preset,
        "overrides": overrides,
        "budget_min": args.budget_min,
        "split": args.split,
        "step_s": step_s,
        "epochs": epochs,
        "images_per_epoch": per_epoch,
        "train_minutes": result["train_minutes"],
        "knn_top1": final["top1"],
        "knn_top5": final["top5"],
        "curve": [(r["train_minutes"], r["top1"]) for r in rows],
    }
    (Path(args.out) / "benchmark.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nRESULT {args.preset} {' '.join(overrides)}: k-NN top-1 {final['top1']:.2f}% after "
        f"{result['train_minutes']:.1f} min ({args.split} split)"
    )


if __name__ == "__main__":
    main()
