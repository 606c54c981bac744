#!/usr/bin/env python
"""Does ``data.pipeline=gpu`` learn as well as the tensor path? Several seeds of one budget each.

For every seed, ``ibot pretrain`` runs the same preset (default ``fmnist_tiny``, one epoch) once with
``data.pipeline=tensor`` (batched augmentation of in-memory images) and once with
``data.pipeline=gpu`` (DataLoader workers crop and flip uint8 images; jitter, grayscale, blur,
solarization and normalisation run batched on the training device: the CPU here). Each run ends
with the k-NN top-1 of the teacher's CLS on the Fashion-MNIST test split. The script prints every
run, the mean and the sample standard deviation per pipeline, and the difference of the means with
its standard error; "equal within noise" means the difference is within two standard errors.

    python benchmarks/pipeline_quality.py --seeds 0 1 2 --out runs/pipeline_quality
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(preset: str, pipeline: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One ``ibot pretrain`` in its own process; returns its summary.json."""
    folder = out / f"{pipeline}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "ibot",
        "pretrain",
        f"preset={preset}",
        f"data.pipeline={pipeline}",
        f"run.seed={seed}",
        f"run.output_dir={folder}",
        "run.progress=false",
        *extra,
        "--fresh",
    ]
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "pipeline": pipeline,
        "seed": seed,
        "knn_top1": summary["knn"]["top1"],
        "train_minutes": summary["train_minutes"],
        "wall_minutes": (time.time() - t) / 60,
        "final_loss": summary.get("final_loss"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist_tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--gpu-workers", type=int, default=1, help="data.num_workers of the gpu pipeline")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for both pipelines")
    p.add_argument("--out", default="runs/pipeline_quality")
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:  # interleaved, so a slower hour of the machine touches both pipelines
        rows.append(run(args.preset, "tensor", seed, out, args.set))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(run(args.preset, "gpu", seed, out, [*args.set, f"data.num_workers={args.gpu_workers}"]))
        print(json.dumps(rows[-1]), flush=True)
    acc = {k: [r["knn_top1"] for r in rows if r["pipeline"] == k] for k in ("tensor", "gpu")}
    stats = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0} for k, v in acc.items()}
    n = len(args.seeds)
    diff = stats["gpu"]["mean"] - stats["tensor"]["mean"]
    se = ((stats["gpu"]["std"] ** 2 + stats["tensor"]["std"] ** 2) / n) ** 0.5 if n > 1 else float("nan")
    result = {"preset": args.preset, "seeds": args.seeds, "runs": rows, "stats": stats, "gpu_minus_tensor": diff}
    result["standard_error"] = se
    result["within_two_standard_errors"] = bool(abs(diff) <= 2 * se)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_quality.json").write_text(json.dumps(result, indent=2))
    for k, s in stats.items():
        print(f"{k:6s} k-NN top-1 {s['mean']:.2f} +- {s['std']:.2f} (n={n}): {acc[k]}")
    print(f"RESULT gpu - tensor = {diff:+.2f} points, standard error {se:.2f}; within noise: {abs(diff) <= 2 * se}")


if __name__ == "__main__":
    main()
