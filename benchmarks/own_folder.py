"""Own-folder benchmark: what `ibot pretrain data.path=DIR` alone gives a new user, measured from outside.

Builds ImageFolder folders of PNGs from an installed real data set (Fashion-MNIST or MNIST, upscaled
to look like a folder of photos), runs ``ibot pretrain data.path=DIR run.output_dir=RUN`` with no
other key on this machine, then scores the run's teacher with ``ibot knn`` on *further* images of the
same kind (a disjoint ``train/`` bank and a large ``val/`` query set, not the run's small hold-out),
beside the untrained model of the same architecture and raw pixels on the same split.

    python benchmarks/own_folder.py                       # the three cases (about 40 min on 2 cores)
    python benchmarks/own_folder.py --case fmnist600      # one case
    python benchmarks/own_folder.py --build-only --out /tmp/folders   # just the folders

Prints one line per case and writes ``benchmarks/results/own_folder-DATE.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (dataset, classes, training images, image size, val/ in the training folder)
CASES = {
    "fmnist600": ("fashion_mnist", [2, 4], 600, 112, False),  # pullover vs coat, as the 2-class photo folder
    "fmnist1500": ("fashion_mnist", list(range(10)), 1500, 96, False),
    "mnist3000": ("mnist", list(range(10)), 3000, 128, True),
}
EVAL_BANK, EVAL_QUERIES = 1000, 2000  # per case: a disjoint bank (train/) and query set (val/)


def _arrays(dataset: str, train: bool):
    from ibot.data.datasets import build_dataset

    ds = build_dataset(dataset, None, train=train)
    return ds.images[:, 0].numpy(), ds.labels.numpy()


def _pick(labels: np.ndarray, classes: list[int], n: int, rng: np.random.Generator, taken: set[int]) -> list[int]:
    """``n`` indices spread evenly over ``classes``, none already in ``taken`` (then added to it)."""
    out = []
    for j, c in enumerate(classes):
        want = n // len(classes) + (j < n % len(classes))
        pool = [i for i in rng.permutation(np.flatnonzero(labels == c)) if i not in taken][:want]
        out += pool
    taken.update(out)
    return out


def _write(folder: Path, images: np.ndarray, labels: np.ndarray, idx: list[int], size: int) -> None:
    for i in idx:
        d = folder / f"class_{labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).save(d / f"{i:05d}.png")


def build_case(name: str, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """(training folder, evaluation folder with train/ + val/) of a case, built once."""
    dataset, classes, n, size, with_val = CASES[name]
    train_dir, eval_dir = out / name / "images", out / name / "further"
    if (out / name / "done").exists():
        return train_dir, eval_dir
    rng = np.random.default_rng(seed)
    images, labels = _arrays(dataset, train=True)
    test_images, test_labels = _arrays(dataset, train=False)
    taken: set[int] = set()
    if with_val:  # a train/ + val/ layout: val/ from the test split, as a user with a val folder
        _write(train_dir / "train", images, labels, _pick(labels, classes, n, rng, taken), size)
        _write(train_dir / "val", test_images, test_labels, _pick(test_labels, classes, n // 5, rng, set()), size)
    else:
        _write(train_dir, images, labels, _pick(labels, classes, n, rng, taken), size)
    _write(eval_dir / "train", images, labels, _pick(labels, classes, EVAL_BANK, rng, taken), size)
    queries = _pick(test_labels, classes, EVAL_QUERIES, rng, {-1})  # disjoint from the training folder's val/
    _write(eval_dir / "val", test_images, test_labels, queries, size)
    (out / name / "done").write_text("ok")
    return train_dir, eval_dir


def _ibot(*args: str, log: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ibot", *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        f.write(res.stdout)
    if res.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed ({res.returncode}); see {log}")
    return res


def run_case(name: str, out: Path) -> dict:
    train_dir, eval_dir = build_case(name, out)
    run, log = out / name / "run", out / name / "log.txt"
    t0 = time.time()
    res = _ibot("pretrain", f"data.path={train_dir}", f"run.output_dir={run}", "run.progress=false", log=log)
    minutes = (time.time() - t0) / 60
    fitted = [line.strip() for line in res.stdout.splitlines() if line.startswith("  ") and " <- " in line]
    stopped = [line for line in res.stdout.splitlines() if "time limit" in line]
    summary = json.loads((run / "summary.json").read_text())
    knn = _ibot("knn", str(run), "--data", str(eval_dir), "--json", "--no-progress", log=log)
    further = json.loads(knn.stdout.strip().splitlines()[-1])
    return {
        "case": name,
        "spec": dict(zip(("dataset", "classes", "images", "size", "val"), CASES[name], strict=True)),
        "minutes": minutes,
        "fitted": fitted,
        "images_per_s": summary.get("images_per_s"),
        "train_minutes": summary.get("train_minutes"),
        "time_limit_hit": bool(stopped),
        "holdout_knn": summary.get("knn"),
        "further_knn": further,
    }


def _line(r: dict) -> str:
    f = r["further_knn"]
    k = "20" if "20" in f["knn"] else sorted(f["knn"], key=int)[0]
    text = f"{r['case']}: {r['minutes']:.1f} min; further images k-NN top-1 {f['knn'][k]['top1']:.2f}%"
    base = f.get("baselines") or {}
    for what in ("untrained", "pixels"):
        if what in base:
            b = base[what][k]["top1"]
            text += f" | {what} {b:.2f}% ({f['knn'][k]['top1'] - b:+.2f})"
    h = r["holdout_knn"] or {}
    text += f" ({f['n_test']} queries, bank {f['n_train']}); own hold-out {h.get('top1', float('nan')):.1f}%"
    return text + f"; {r['images_per_s']:.0f} img/s{', stopped by the time limit' if r['time_limit_hit'] else ''}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    p.add_argument("--out", default="/tmp/ibot-own-folder", help="where the folders and runs go")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    results = []
    for name in args.case or list(CASES):
        if args.build_only:
            print(name, *build_case(name, out))
            continue
        r = run_case(name, out)
        print(_line(r), flush=True)
        results.append(r)
    if results:
        path = ROOT / "benchmarks" / "results" / f"own_folder-{datetime.date.today()}.json"
        path.write_text(json.dumps(results, indent=2).replace(str(out), "OUT"))  # no machine paths
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
