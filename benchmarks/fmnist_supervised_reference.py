#!/usr/bin/env python
"""Supervised reference for the Fashion-MNIST quality benchmark: the same ViT, trained with labels.

Trains the preset's backbone (same width, depth, patch size) with cross-entropy on a linear
classifier over the CLS token (AdamW, constant ``--lr``, the preset's batch) for ``--budget-min``
minutes of training on the 60k training images (50k with ``--split val``), with the preset's first
global-crop augmentation, and measures k-NN top-1 every ``--knn-every-min`` minutes as the benchmark does
(k = 20, cosine, exp(sim / 0.07), on the L2-normalised CLS). It tells how far the architecture and
the budget can go when the labels are given, i.e. what an SSL recipe could at best approach.

    python benchmarks/fmnist_supervised_reference.py --preset fmnist_tiny --budget-min 5 --split val
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibot.builders.data import batch_augment_from_config, dataset_from_config  # noqa: E402
from ibot.config import build_config  # noqa: E402
from ibot.data.datasets import validation_split  # noqa: E402
from ibot.eval.knn import extract_features, knn_classify  # noqa: E402
from ibot.models.backbone import create_vit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist_tiny")
    p.add_argument("--budget-min", type=float, default=5.0)
    p.add_argument("--split", choices=("test", "val"), default="val")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/bench_supervised", help="folder for benchmark.json (plot_quality.py)")
    p.add_argument("--knn-every-min", type=float, default=5.0, help="minutes between k-NN measurements")
    args = p.parse_args()
    cfg = build_config(args.preset, args.set)
    m, o = cfg.model, cfg.optim
    torch.manual_seed(cfg.run.seed)
    train = dataset_from_config(cfg, train=True)
    if args.split == "val":
        train, test = validation_split(train)  # the same 50k / 10k split as fmnist_quality.py --split val
    else:
        test = dataset_from_config(cfg, train=False)
    net = create_vit(
        m.arch, patch_size=m.patch_size, img_size=m.img_size, in_chans=m.in_chans,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
    )  # fmt: skip
    clf = torch.nn.Linear(m.embed_dim, int(train.labels.max()) + 1)
    params = [*net.parameters(), *clf.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=o.weight_decay)
    cfg.data.local_crops_number = 0  # one global crop per image is used below
    augment = batch_augment_from_config(cfg)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    kw = {"image_size": m.img_size, "in_chans": m.in_chans}

    def knn() -> float:
        net.eval()
        ftr, ltr = extract_features(net, train, **kw)
        fte, lte = extract_features(net, test, **kw)
        net.train()
        return knn_classify(ftr, ltr, fte, lte, ks=(20,))[20][0]

    n, b = len(train), o.batch_size
    budget, every = args.budget_min * 60, (args.knn_every_min or args.budget_min) * 60
    trained, steps, curve = 0.0, 0, []  # training seconds exclude the k-NN evaluations
    while trained < budget:
        t = time.time()
        idx = torch.randperm(n, generator=gen)[:b]
        crops, _ = augment(train.images[idx], gen)
        x = crops[:b]  # first global crop
        loss = F.cross_entropy(clf(net(x)), train.labels[idx].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        trained += time.time() - t
        if steps % 100 == 0:
            print(f"step {steps}  loss {loss.item():.3f}  {trained / 60:.1f} min", flush=True)
        if trained >= every * (len(curve) + 1) or trained >= budget:
            curve.append((trained / 60, steps, knn()))
            print(f"k-NN top-1 {curve[-1][2]:.2f}% after {trained / 60:.1f} min, {steps} steps", flush=True)
    print("\nminutes  steps  k-NN top-1 (k=20)")
    for minutes, st, top1 in curve:
        print(f"{minutes:7.2f}  {st:5d}  {top1:6.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"preset": args.preset, "overrides": args.set, "supervised": True, "split": args.split, "lr": args.lr}
    summary.update(budget_min=args.budget_min, steps=steps, knn_top1=curve[-1][2], curve=[(c[0], c[2]) for c in curve])
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2))
    what = f"supervised {args.preset} {' '.join(args.set)}"
    print(f"RESULT {what}: k-NN top-1 {curve[-1][2]:.2f}% after {steps} steps ({args.split} split)")


if __name__ == "__main__":
    main()
