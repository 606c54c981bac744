#!/usr/bin/env python
"""Plot k-NN top-1 against training minutes from ``fmnist_quality.py`` run folders.

    python benchmarks/plot_quality.py runs/bench_ibot:iBOT runs/bench_dino:DINO \
        --out benchmarks/results/fmnist_knn_vs_minutes.png

Each argument is ``RUN_FOLDER[:LABEL]``; the curve is read from its ``benchmark.json`` and starts at
the random-init score given by ``--start`` (k-NN of the untrained teacher, minute 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="RUN_FOLDER[:LABEL]")
    p.add_argument("--out", default="benchmarks/results/fmnist_knn_vs_minutes.png")
    p.add_argument("--start", type=float, default=None, help="k-NN top-1 at minute 0 (random init)")
    p.add_argument("--refs", nargs="*", default=[], metavar="LABEL=VALUE", help="horizontal reference lines")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in args.runs:
        folder, _, label = spec.partition(":")
        bench = json.loads((Path(folder) / "benchmark.json").read_text())
        pts = [(0.0, args.start)] if args.start is not None else []
        pts += [(float(m), float(a)) for m, a in bench["curve"]]
        ax.plot([m for m, _ in pts], [a for _, a in pts], marker="o", label=label or folder)
    for ref in args.refs:
        name, _, value = ref.partition("=")
        ax.axhline(float(value), ls="--", lw=0.8, color="gray")
        ax.text(
            0.99, float(value) + 0.3, name, fontsize=7, color="gray", ha="right", transform=ax.get_yaxis_transform()
        )
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title("Fashion-MNIST test, k-NN (k=20) on the CLS features")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
