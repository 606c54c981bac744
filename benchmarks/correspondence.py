#!/usr/bin/env python
"""Two-view patch correspondence of a trained backbone against the same architecture at random init.

For each test image, two overlapping crops (top-left and bottom-right, 75% wide) are resized back
to the input size; each patch of view A inside view B is matched to its most similar patch of B
(cosine of the final patch tokens) and counts as right when it lands on the patch the crop
geometry predicts (tolerance 0.5 patch: the nearest cell). Prints trained / random-init / chance.

    python benchmarks/correspondence.py runs/fmnist_tiny --n 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibot import viz  # noqa: E402
from ibot.builders.model import build_model  # noqa: E402
from ibot.builders.sources import load_backbone  # noqa: E402
from ibot.config import from_dict  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="an ibot run folder or checkpoint")
    p.add_argument("--n", type=int, default=300, help="test images")
    p.add_argument("--tolerance", type=float, default=0.5)
    args = p.parse_args()
    trained, info, _ = load_backbone(args.run)
    torch.manual_seed(0)
    random_init = build_model(from_dict(info["config"])).teacher["backbone"]
    images = viz.load_images(info, n=args.n)
    for name, bb in (("trained", trained.eval()), ("random init", random_init.eval())):
        r = viz.correspondence_accuracy(bb, images, tolerance=args.tolerance)
        print(f"{name:12s} {100 * r['accuracy']:5.1f}%   (random matches {100 * r['chance']:.1f}%, {r['n']} images)")


if __name__ == "__main__":
    main()
