#!/usr/bin/env python
"""Data at scale: Fashion-MNIST as an ImageFolder and as WebDataset shards, side by side.

1. ``convert``: N Fashion-MNIST training images written as an ImageFolder of PNGs, then
   ``ibot shards`` of that folder (seconds, MB);
2. ``startup``: what a run pays before its first batch: the folder's file list (first start: scan;
   second start: the cache) and the shards' index (a tar scan without ``index.json``, with it, and the
   cached scan);
3. ``worker``: CPU milliseconds per image of one DataLoader worker (one torch thread), folder vs shards,
   for ``data.pipeline=pil`` (decode + the multi-crop recipe) and the worker half of ``gpu``
   (torchvision decode + crop/flip);
4. ``pretrain``: a short ``fmnist_tiny`` pretraining from the folder and from the shards (same
   seed, steps, batch): images/s, final loss and k-NN top-1 on each one's held-out split;
5. ``--listing-files N`` (default off): a synthetic folder of N tiny files under a temp folder,
   the file list's first and second start (deleted afterwards).

The defaults (2000 images, 20 steps of 32) take a few minutes on 2 idle CPU cores; the committed
results used ``--images 4000 --steps 30 --batch 64 --listing-files 200000``:

    python benchmarks/data_at_scale.py --out benchmarks/results/data-at-scale.json
    python benchmarks/data_at_scale.py --images 4000 --steps 30 --batch 64 --listing-files 200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def convert(work: Path, n: int) -> dict:
    """Fashion-MNIST train images 0..n-1 -> ``work/folder/CLASS/i.png`` -> ``work/shards``."""
    from PIL import Image

    from ibot.data.datasets import build_dataset
    from ibot.data.shard_writer import write_shards

    fm = build_dataset("fashion_mnist", train=True)
    t0 = time.perf_counter()
    for i in range(n):
        cls = fm.classes[int(fm.labels[i])].replace("/", "-")
        (work / "folder" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(fm.images[i, 0].numpy(), "L").save(work / "folder" / cls / f"{i:06d}.png")
    t_folder = time.perf_counter() - t0
    _, t_shards = timed(write_shards, work / "folder", work / "shards", shard_size=1000, progress=False, log=str)
    mb = sum(p.stat().st_size for p in (work / "shards").glob("*.tar")) / 1e6
    return {"images": n, "folder_s": t_folder, "shards_s": t_shards, "shards_mb": mb}


def startup(work: Path) -> dict:
    """Seconds to list the folder / index the shards, first and second start (a cache of its own: the
    conversion's listing does not count)."""
    import ibot.data.datasets as datasets
    import ibot.data.shards as shards

    out = {}
    for name, cache in (("first", work / "cache-startup"), ("second", work / "cache-startup")):
        datasets.CACHE = shards.CACHE = cache
        out[f"folder_{name}_s"] = timed(datasets.FileImageDataset, work / "folder")[1]
        out[f"shards_index_json_{name}_s"] = timed(shards.ShardDataset, work / "shards", False)[1]
    plain = work / "shards_plain"
    shutil.copytree(work / "shards", plain)
    (plain / shards.INDEX_FILE).unlink()
    out["shards_scan_first_s"] = timed(shards.ShardDataset, plain, False)[1]
    out["shards_scan_second_s"] = timed(shards.ShardDataset, plain, False)[1]
    return out


def worker_cost(work: Path, n: int = 256) -> dict:
    """CPU ms per image on one thread: dataset item + crops, folder vs shards, pil and gpu worker halves."""
    from ibot.builders.data import crop_flip_dataset_from_config, pil_transform_from_config
    from ibot.config import build_config
    from ibot.data.datasets import FileImageDataset
    from ibot.data.loader import MultiCropDataset
    from ibot.data.shards import ShardDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = build_config("fmnist_tiny")
    out = {}
    for name, ds in (("folder", FileImageDataset(work / "folder")), ("shards", ShardDataset(work / "shards"))):
        for pipe, wrapped in (
            ("pil", MultiCropDataset(ds, pil_transform_from_config(cfg), seed=0)),
            ("gpu_worker", crop_flip_dataset_from_config(cfg, ds)),
        ):
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
            t0 = time.process_time()
            for i in idx:
                wrapped[(0, i)]
            out[f"{name}_{pipe}_ms"] = 1000 * (time.process_time() - t0) / n
    torch.set_num_threads(threads)
    return out


def pretrain(work: Path, steps: int, batch: int, workers: int) -> dict:
    """A short ``fmnist_tiny`` run from the folder and from the shards (pil pipeline, same seed and steps)."""
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    out = {}
    for name, data in (
        ("folder", ["data.dataset=imagefolder", f"data.path={work / 'folder'}"]),
        ("shards", ["data.dataset=wds", f"data.path={work / 'shards'}"]),
    ):
        ov = [*data, "data.pipeline=pil", f"data.num_workers={workers}", f"optim.batch_size={batch}"]
        ov += [f"run.max_steps={steps}", "run.progress=false", f"run.output_dir={work / ('run_' + name)}"]
        ov += ["run.knn_every=0", "run.knn_k=20"]
        trainer = Trainer(build_config("fmnist_tiny", ov), log=lambda *a: None)
        result, seconds = timed(trainer.fit)
        trainer.data.close()  # its persistent DataLoader workers
        knn = result.get("knn") or {}
        out[name] = {
            "seconds": seconds,
            "images_per_s": result.get("images_per_s"),
            "final_loss": result.get("final_loss"),
            "knn_top1": knn.get("top1"),
            "knn_split": (knn.get("split") or "").replace(str(work), "TMP"),
        }
    return out


def listing(n: int) -> dict:
    """The file list of a synthetic folder of ``n`` tiny files (10 classes): the ``sorted(rglob)`` scan it
    replaced, then :class:`FileImageDataset`'s first (scan) and second (cached) start."""
    import ibot.data.datasets as datasets

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "big"
        for c in range(10):
            (root / f"c{c}").mkdir(parents=True)
            for i in range(c, n, 10):
                (root / f"c{c}" / f"{i:07d}.png").write_bytes(b"\x89PNG tiny")
        ext = datasets.IMG_EXTENSIONS
        t_rglob = timed(lambda: [p for c in sorted(root.iterdir()) for p in sorted(c.rglob("*")) if p.suffix in ext])[1]
        datasets.CACHE = Path(tmp) / "cache"
        first = timed(datasets.FileImageDataset, root)[1]
        second = timed(datasets.FileImageDataset, root)[1]
    return {"files": n, "sorted_rglob_s": t_rglob, "first_start_s": first, "second_start_s": second}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="Fashion-MNIST images to convert (default 2000)")
    p.add_argument("--steps", type=int, default=20, help="pretraining steps per source (default 20)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the pretraining runs")
    p.add_argument("--listing-files", type=int, default=0, help="also time the file list of N synthetic files")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    res = {"args": vars(args), "cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["IBOT_CACHE"] = str(work / "cache")
        for part, fn in (
            ("convert", lambda: convert(work, args.images)),
            ("startup", lambda: startup(work)),
            ("worker", lambda: worker_cost(work)),
            ("pretrain", lambda: pretrain(work, args.steps, args.batch, args.workers)),
        ):
            res[part] = fn()
            print(part, json.dumps(res[part], indent=1), flush=True)
    if args.listing_files:
        res["listing"] = listing(args.listing_files)
        print("listing", json.dumps(res["listing"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
