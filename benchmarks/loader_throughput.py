#!/usr/bin/env python
"""Data-loading cost of the iBOT multi-crop recipe: CPU ms per image per core, and the device half.

Interleaved in one process, on generated ImageNet-like JPEGs (~500x375, quality 90), with one torch
thread (the cost of one DataLoader worker):

* ``official``: bytedance/ibot ``ImageFolderMask`` + ``DataAugmentationiBOT`` + default collate,
  imported from a checkout given by ``--official-src`` (skipped when absent);
* ``ibot_pil``: ``data.pipeline=pil`` (file dataset -> MultiCropTransform -> collate with masks);
* ``ibot_worker``: the worker half of ``data.pipeline=gpu`` (files decoded by torchvision -> CropFlip
  with torch's uint8 bicubic -> uint8 collate); ``ibot_worker_pil``: the same halves on PIL images
  (what Pillow-SIMD speeds up);
* ``device_cpu`` / ``device_cuda``: the device half (DeviceAugment) per image, on the CPU (one
  thread) and on CUDA when present;
* ``decode_pil`` / ``decode_tv``: JPEG decode alone, PIL against ``torchvision.io.decode_jpeg``.

The official ViT-S/16 recipe is used (2 x 224 + 10 x 96 crops, scales (0.25, 1) and (0.05, 0.25)).
``--quick`` is a seconds-long smoke of the same code on tiny images.

``loader_figures(device, num_workers, n_images, ...)`` measures the whole training path with the
real ``Trainer`` (``data.pipeline=gpu``): loader-only, step-only and end-to-end images/s; it is
what ``benchmarks/gpu_check.py`` calls on a GPU machine.

    python benchmarks/loader_throughput.py --official-src /path/to/ibot-official --images 64 --repeats 5
    python benchmarks/loader_throughput.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ibot.builders.data import (  # noqa: E402
    collate_from_config,
    crop_flip_dataset_from_config,
    crop_flip_from_config,
    device_augment_from_config,
    pil_transform_from_config,
)
from ibot.config import build_config  # noqa: E402
from ibot.data.datasets import FileImageDataset  # noqa: E402
from ibot.data.loader import MultiCropDataset  # noqa: E402

RECIPE = [
    "data.global_crops_scale=[0.25,1.0]",
    "data.local_crops_number=10",
    "data.local_crops_scale=[0.05,0.25]",
    "data.local_crop_size=96",
]


# ------------------------------------------------------------------------------------ data
def make_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0, quality: int = 90) -> Path:
    """``n`` natural-looking JPEGs (gradients, blobs, texture) in two class folders; reused if present."""
    root = Path(root)
    files = sorted(root.rglob("*.jpg"))
    if len(files) >= n:
        return root
    rng = np.random.default_rng(seed)
    w0, h0 = size
    for i in range(n):
        w, h = (w0, h0) if i % 3 else (h0, w0)  # a third portrait
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = rng.uniform(0.2, 0.8, 3) + 0.3 * (rng.uniform(-1, 1, 3) * xx[..., None] / w)
        img = img + 0.3 * rng.uniform(-1, 1, 3) * yy[..., None] / h
        for _ in range(6):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
            img = np.where(blob, rng.uniform(0, 1, 3), img)
        img = img + rng.normal(0, 0.05, (h, w, 3))  # sensor-like texture (sets the JPEG size)
        out = root / f"c{i % 2}" / f"img{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(out, quality=quality)
    return root


def recipe_config(data_dir: Path, quick: bool, extra=()):
    preset = "smoke" if quick else "vit_small_in1k"
    over = [] if quick else RECIPE
    return build_config(preset, [*over, "data.dataset=imagefolder", f"data.path={data_dir}", *extra])


# ------------------------------------------------------------------------------------ pipelines
def official_pipeline(src: str | None, data_dir: Path, quick: bool):
    """bytedance/ibot's dataset + transform + default collate, or None when ``src`` is absent."""
    if not src or not (Path(src) / "main_ibot.py").is_file():
        return None
    if src not in sys.path:
        sys.path.insert(0, src)
    for name in ["tensorboardX", "evaluation", "evaluation.unsupervised", "evaluation.unsupervised.unsup_cls"]:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["tensorboardX"].SummaryWriter = None
    sys.modules["evaluation.unsupervised.unsup_cls"].eval_pred = None
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import main_ibot  # noqa: PLC0415
        from loader import ImageFolderMask  # noqa: PLC0415

    gscale, lscale, nl = ((0.4, 1.0), (0.05, 0.4), 2) if quick else ((0.25, 1.0), (0.05, 0.25), 10)
    transform = main_ibot.DataAugmentationiBOT(gscale, lscale, 2, nl)
    if quick:  # the official transform has fixed 224 / 96 sizes; shrink them for the smoke
        for t in (transform.global_transfo1, transform.global_transfo2, transform.local_transfo):
            t.transforms[0].size = (32, 32) if t is not transform.local_transfo else (16, 16)
    ds = ImageFolderMask(
        str(data_dir),
        transform=transform,
        patch_size=8 if quick else 16,
        pred_ratio=[0.0, 0.3],
        pred_ratio_var=[0.0, 0.2],
        pred_aspect_ratio=(0.3, 1 / 0.3),
        pred_shape="block",
    )
    return ds, torch.utils.data.default_collate


def ibot_pipelines(data_dir: Path, quick: bool):
    cfg = recipe_config(data_dir, quick)
    files = FileImageDataset(data_dir)
    collate = collate_from_config(cfg)
    return (
        cfg,
        {
            "ibot_pil": (MultiCropDataset(files, pil_transform_from_config(cfg)), collate),
            "ibot_worker": (crop_flip_dataset_from_config(cfg, files), collate),
            "ibot_worker_pil": (MultiCropDataset(files, crop_flip_from_config(cfg)), collate),
        },
    )


def time_pipeline(dataset, collate, indices: list[int], batch: int) -> float:
    """CPU seconds (this thread) to load, augment and collate ``indices`` in batches of ``batch``."""
    t = time.thread_time()
    for k in range(0, len(indices), batch):
        collate([dataset[i] for i in indices[k : k + batch]])
    return time.thread_time() - t


def time_device_half(aug, cfg, batch: int, device: torch.device, repeats: int) -> float:
    """Seconds per image of DeviceAugment on ``device`` (median of ``repeats`` batches)."""
    from ibot.data.loader import Batch

    d, m = cfg.data, cfg.model
    g = torch.randint(0, 256, (d.global_crops_number * batch, 3, m.img_size, m.img_size), dtype=torch.uint8)
    n_local = d.local_crops_number
    loc = torch.randint(0, 256, (n_local * batch, 3, d.local_crop_size, d.local_crop_size), dtype=torch.uint8)
    b = Batch(g, loc if n_local else None, None, torch.zeros(batch), d.global_crops_number, n_local).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for r in range(repeats + 1):
        sync()
        t = time.perf_counter()
        aug(b, torch.Generator().manual_seed(r))
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) / batch


def time_decode(files: list[str]) -> dict[str, float]:
    """Seconds per image to decode each JPEG: PIL, and torchvision.io.decode_jpeg (libjpeg-turbo)."""
    from torchvision.io import decode_jpeg, read_file

    out = {}
    t = time.thread_time()
    for f in files:
        with Image.open(f) as img:
            img.convert("RGB").load()
    out["decode_pil"] = (time.thread_time() - t) / len(files)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        t = time.thread_time()
        for f in files:
            decode_jpeg(read_file(f))
        out["decode_tv"] = (time.thread_time() - t) / len(files)
    return out


def per_core_costs(args) -> dict:
    torch.set_num_threads(1)
    data_dir = make_jpegs(Path(args.data), args.images, (64, 48) if args.quick else (500, 375))
    cfg, impls = ibot_pipelines(data_dir, args.quick)
    official = official_pipeline(args.official_src, data_dir, args.quick)
    if official is not None:
        impls = {"official": official, **impls}
    else:
        print("official: skipped (pass --official-src DIR, a bytedance/ibot checkout)")
    n = len(impls[next(iter(impls))][0])
    indices = list(range(min(n, args.images)))
    files = [impls["ibot_pil"][0].dataset.samples[i][0] for i in indices]
    names = list(impls)
    seconds: dict[str, list[float]] = {k: [] for k in [*names, "decode_pil", "decode_tv"]}
    for rep in range(args.repeats):  # interleaved; the order rotates every repeat
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            ds, collate = impls[name]
            seconds[name].append(time_pipeline(ds, collate, indices, args.batch) / len(indices))
        for k, v in time_decode(files).items():
            seconds[k].append(v)
    ms = {k: 1000 * statistics.median(v) for k, v in seconds.items()}
    aug = device_augment_from_config(cfg)
    ms["device_cpu"] = 1000 * time_device_half(aug, cfg, args.batch, torch.device("cpu"), max(1, args.repeats))
    if torch.cuda.is_available():
        ms["device_cuda"] = 1000 * time_device_half(aug, cfg, args.device_batch, torch.device("cuda"), 10)
    import PIL

    return {
        "ms_per_image": ms,
        "images": len(indices),
        "repeats": args.repeats,
        "pillow": PIL.__version__,
        "pillow_simd": ".post" in PIL.__version__,
        "official": official is not None,
    }


def report(res: dict, step_ips: float) -> None:
    ms = res["ms_per_image"]
    print(f"\nCPU ms per image on one thread ({res['images']} images, median of {res['repeats']} interleaved repeats)")
    print(f"Pillow {res['pillow']}{' (SIMD)' if res['pillow_simd'] else ''}")
    print(f"{'pipeline':<14}{'ms/image':>10}{'images/s/core':>15}{'vs official':>13}")
    ref = ms.get("official")
    for name, v in ms.items():
        ratio = f"{v / ref:.2f}x" if ref and name.startswith("ibot") else ""
        print(f"{name:<14}{v:>10.2f}{1000 / v:>15.1f}{ratio:>13}")
    print(f"\ncores to feed {step_ips:.0f} images/s per GPU (a ViT-S/16 step; --step-ips):")
    for name in ("official", "ibot_pil", "ibot_worker"):
        if name in ms:
            print(f"  {name:<12} {step_ips * ms[name] / 1000:6.1f} cores per GPU")


# ------------------------------------------------------------------------------------ whole path
def loader_figures(
    device: str | torch.device,
    num_workers: int,
    n_images: int,
    *,
    batch_size: int = 64,
    step_repeats: int = 10,
    data_dir: str | Path | None = None,
    preset: str = "vit_small_in1k",
    overrides: list[str] | tuple[str, ...] = (),
    image_size: tuple[int, int] = (500, 375),
) -> dict:
    """Images/s of the ``data.pipeline=gpu`` training path with the real Trainer on ``device``.

    An untimed warm-up epoch of loading + steps comes first (worker start, page cache, kernel
    selection); then, with the same persistent workers:

    * ``loader_ips``: one epoch of device batches (workers -> pinned uint8 -> side-stream copy ->
      DeviceAugment), no step;
    * ``step_ips``: ``step_repeats`` training steps on one resident batch (no loading);
    * ``end_to_end_ips``: one epoch of loading + training steps; ``end_to_end_over_step`` is the
      target ratio (>= 0.9 on a GPU node).

    Epoch figures are timed from the start of the epoch, so they include filling the pipeline (each
    worker's first batch), a cost real epochs of thousands of steps do not see; the
    ``*_after_fill_ips`` figures start at the arrival of batch ``num_workers`` instead (the workers'
    second round). ``preset`` + the official ViT-S recipe + ``overrides``; images are generated
    JPEGs of ``image_size`` under ``data_dir`` (a temporary folder when None).
    """
    from ibot.train.trainer import Trainer

    device = torch.device(device)
    tmp = tempfile.TemporaryDirectory()
    data = make_jpegs(Path(data_dir) if data_dir else Path(tmp.name) / "jpegs", n_images, image_size)
    over = [
        *(RECIPE if preset == "vit_small_in1k" else []),
        "data.dataset=imagefolder",
        f"data.path={data}",
        "data.pipeline=gpu",
        f"data.num_workers={num_workers}",
        f"optim.batch_size={batch_size}",
        f"data.limit={n_images}",
        "data.holdout=0",  # every generated image trains
        f"run.device={device.type}",
        f"run.output_dir={Path(tmp.name) / 'run'}",
        "run.progress=false",
        "run.knn_at_end=false",
        *overrides,
    ]
    tr = Trainer(build_config(preset, over), log=lambda *a: None, resume="never")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(batches, fn, skip: int) -> tuple[float, float, int, object]:
        """(images/s from the start, images/s from batch ``skip`` on, images, first batch)."""
        sync()
        n, n_after, first, t_after = 0, 0, None, None
        t0 = time.perf_counter()
        for k, b in enumerate(batches):
            fn(b, k)
            first = first if first is not None else b
            n += b.batch_size
            if k == skip - 1:
                sync()
                t_after = time.perf_counter()
            elif k >= skip:
                n_after += b.batch_size
        sync()
        t1 = time.perf_counter()
        after = n_after / (t1 - t_after) if t_after is not None and n_after else float("nan")
        return n / (t1 - t0), after, n, first

    tr.model.train()
    skip = max(1, num_workers)
    _, _, _, batch = timed(tr.data.batches(0), lambda b, k: tr.train_step(b, k), skip)  # warm-up
    loader_ips, loader_after, n_loader, _ = timed(tr.data.batches(1), lambda b, k: None, skip)
    step_ips, _, _, _ = timed([batch] * step_repeats, lambda b, k: tr.train_step(b, k), 1)
    # the schedule position only sets lr / weight decay / temperature values, not the cost
    e2e_ips, e2e_after, n_e2e, _ = timed(tr.data.batches(2), lambda b, k: tr.train_step(b, k), skip)
    aug_ms = 1000 * time_device_half(tr.data.device_augment, tr.cfg, batch_size, device, 5)
    res = {
        "device": str(device),
        "num_workers": num_workers,
        "n_images": len(tr.data.train_set),
        "batch_size": batch_size,
        "precision": tr.precision,
        "steps_per_epoch": tr.data.niter,
        "loader_ips": loader_ips,
        "loader_after_fill_ips": loader_after,
        "step_ips": step_ips,
        "end_to_end_ips": e2e_ips,
        "end_to_end_after_fill_ips": e2e_after,
        "end_to_end_over_step": e2e_ips / step_ips,
        "end_to_end_after_fill_over_step": e2e_after / step_ips,
        "device_half_ms_per_image": aug_ms,
        "device_half_share_of_step": aug_ms / 1000 * step_ips,
        "timed_images": {"loader": n_loader, "end_to_end": n_e2e},
    }
    tr.data.loader = None  # shuts the persistent workers down before the folder goes
    tmp.cleanup()
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-src", default=os.environ.get("IBOT_OFFICIAL_SRC"), help="bytedance/ibot checkout")
    p.add_argument("--data", default=None, help="folder for the generated JPEGs (kept; default: a temporary one)")
    p.add_argument("--images", type=int, default=64, help="images per repeat and pipeline")
    p.add_argument("--batch", type=int, default=16, help="collate batch of the per-core timing")
    p.add_argument("--device-batch", type=int, default=64, help="batch of the CUDA device-half timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-ips", type=float, default=1500.0, help="images/s one GPU's step consumes")
    p.add_argument("--figures", action="store_true", help="also run loader_figures (loader/step/end-to-end)")
    p.add_argument("--workers", type=int, default=14, help="DataLoader workers of --figures")
    p.add_argument("--figure-images", type=int, default=4000, help="images of --figures")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke on tiny images")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats, args.device_batch = 8, 4, 1, 4
    tmp = tempfile.TemporaryDirectory()
    args.data = args.data or str(Path(tmp.name) / "jpegs")
    res = per_core_costs(args)
    report(res, args.step_ips)
    if args.figures or args.quick:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.quick:
            fig = loader_figures(device, 0, 32, batch_size=8, step_repeats=1, preset="smoke", image_size=(64, 48))
        else:
            fig = loader_figures(device, args.workers, args.figure_images)
        res["figures"] = fig
        print("\nwhole path (data.pipeline=gpu): " + ", ".join(f"{k}={v}" for k, v in fig.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
