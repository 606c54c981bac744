#!/usr/bin/env python
"""Kernel launches and host syncs of one training step (ViT-S/16, official recipe), counted on the CPU.

Counts every ATen op of one full :class:`ibot.train.step.TrainStep` call (forward, backward,
clipping, AdamW, centers, EMA) with :class:`ibot.train.counters.OpCounter`; the code path and so
the counts are those of a GPU step. The counts do not depend on the batch or image size (the
defaults are small so it runs in about a minute on a laptop CPU)::

    python benchmarks/step_counts.py                     # ViT-S/16, 2 global + 10 local crops
    python benchmarks/step_counts.py --local-crops 0 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch


def count_step(arch="vit_small_in1k", batch=2, local_crops=10, img=224, local_img=96, steps_before=1):
    from ibot.builders.model import build_model
    from ibot.config import build_config
    from ibot.data.loader import Batch
    from ibot.data.masking import MaskBatch, sample_masks
    from ibot.train.counters import OpCounter
    from ibot.train.schedules import StepValues
    from ibot.train.step import TrainStep

    torch.manual_seed(0)
    cfg = build_config(arch, ["data.dataset=synthetic", f"model.img_size={img}"])
    model = build_model(cfg)
    grid = model.student["backbone"].grid_size(img, img)
    mb = MaskBatch.from_masks(sample_masks(model.mask_generator, 2 * batch, grid, epoch=1), 2)
    g = torch.randn(2 * batch, 3, img, img)
    loc = torch.randn(local_crops * batch, 3, local_img, local_img) if local_crops else None
    b = Batch(g, loc, mb, torch.zeros(batch, dtype=torch.long), 2, local_crops)
    step = TrainStep(model, clip_grad=cfg.optim.clip_grad)
    values = StepValues(1, 1, 1e-4, 0.04, 0.996, *model.teacher_temperatures(1), False)
    for _ in range(steps_before):  # the optimizer state exists from the first step on
        step(b, values)
    with OpCounter() as c:
        step(b, values)
    return {"launches": c.launches, "syncs": c.syncs, "sync_ops": dict(c.sync_ops), "top_ops": c.by_op.most_common(20)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_small_in1k")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--json", help="write the counts here")
    a = p.parse_args()
    res = count_step(a.preset, a.batch, a.local_crops, a.img)
    print(f"launches per step: {res['launches']}   host syncs inside the step: {res['syncs']} {res['sync_ops']}")
    print("most frequent ops:", ", ".join(f"{k} {v}" for k, v in res["top_ops"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
