"""Fine-tuning on a small image folder (issue 24): linear probe vs ``ibot finetune`` on a few hundred images.

Builds an ImageFolder of PNGs (class sub-folders, no ``val/``: 10% of each class is held out) from
Fashion-MNIST training images upscaled to ``--size`` px, pretrains ``fmnist_tiny`` on it briefly,
then runs ``ibot linear`` and ``ibot finetune`` (with the fitted settings and, for comparison, any
extra ``--variant`` argument lists) and prints every result line:

    python benchmarks/finetune_small_folder.py --out runs/ft_small_folder \\
        --variant "--mixup 0.8 --cutmix 1.0 --batch-size 128 --epochs 3 --lr 4e-3"

``--val-per-class 500`` also evaluates on a ``val/`` of Fashion-MNIST test images (tighter than the 60 held
out). Set OMP_NUM_THREADS=1 on a busy machine. Results: benchmarks/results/finetune_small_folder.txt.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

FMNIST = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def make_folder(
    root: Path, classes=(5, 7), per_class: int = 300, size: int = 56, seed: int = 0, train: bool = True
) -> Path:
    """``per_class`` random Fashion-MNIST images (training split, or test split for ``train=False``) of each
    class, upscaled (bicubic) to ``size`` px and written as grayscale PNGs to ``root/<class name>/<i>.png``;
    an existing folder is kept."""
    import torch
    from PIL import Image

    from ibot.data.datasets import build_dataset

    if root.is_dir() and any(root.iterdir()):
        return root
    ds = build_dataset("fashion_mnist", None, train=train, image_size=28, in_chans=1)
    gen = torch.Generator().manual_seed(seed)
    for c in classes:
        idx = torch.nonzero(ds.labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]
        (root / FMNIST[c]).mkdir(parents=True)
        for i, j in enumerate(idx.tolist()):
            img = Image.fromarray(ds.images[j, 0].numpy(), mode="L").resize((size, size), Image.BICUBIC)
            img.save(root / FMNIST[c] / f"{i:04d}.png")
    return root


def ibot(*argv: str) -> str:
    """Run ``python -m ibot ARGV``; return its last stdout line (the result line); stderr goes through."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "ibot", *argv], check=True, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    notes = [ln for ln in out.stderr.splitlines() if ln.startswith("finetune:")]
    return "\n".join([*notes, lines[-1], f"({time.time() - t0:.0f} s)"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (the image folder and the run go under it)")
    p.add_argument("--classes", type=int, nargs="+", default=[5, 7], help="Fashion-MNIST classes (sandal, sneaker)")
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--variant", action="append", default=[], help="extra `ibot finetune` arguments to compare")
    p.add_argument(
        "--val-per-class",
        type=int,
        default=0,
        help="also evaluate on a val/ folder of N Fashion-MNIST test images per class (a tighter estimate than "
        "the 10%% held out; training then uses all --per-class images)",
    )
    args = p.parse_args()
    print("$ python " + shlex.join(["benchmarks/finetune_small_folder.py", *sys.argv[1:]]), flush=True)
    out = Path(args.out)
    folder = make_folder(out / "images", tuple(args.classes), args.per_class, args.size)
    run = out / "run"
    if not (run / "checkpoint.pth").exists():
        t0 = time.time()
        subprocess.run(
            [sys.executable, "-m", "ibot", "pretrain", "preset=fmnist_tiny", "data.dataset=imagefolder"]
            + [
                f"data.path={folder}",
                "data.pipeline=pil",
                f"model.img_size={args.size}",
                f"model.patch_size={args.size // 4}",
            ]
            + ["optim.batch_size=64"]
            + [f"optim.epochs={args.pretrain_epochs}", "optim.warmup_epochs=2", "run.progress=false"]
            + [f"run.output_dir={run}", "data.num_workers=0"],
            check=True,
        )
        print(f"pretrain: {time.time() - t0:.0f} s", flush=True)
    data = []
    if args.val_per_class:  # train/ (the same images) and val/ (from the test split)
        with_val = out / "images_with_val"
        for c in args.classes:
            if not (with_val / "train" / FMNIST[c]).exists():
                shutil.copytree(folder / FMNIST[c], with_val / "train" / FMNIST[c])
        make_folder(with_val / "val", tuple(args.classes), args.val_per_class, args.size, train=False)
        data = ["--dataset", "imagefolder", "--data", str(with_val)]
    print(ibot("linear", str(run), "--device", "cpu", "--no-progress", *data), flush=True)
    for extra in ["", *args.variant]:
        print(f"finetune {extra}".strip() + ":", flush=True)
        print(ibot("finetune", str(run), "--device", "cpu", *data, *shlex.split(extra)), flush=True)


if __name__ == "__main__":
    main()
