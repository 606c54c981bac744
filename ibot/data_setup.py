"""``data.path=DIR`` alone: recognise what the folder holds and fit the config to it.

``ibot pretrain data.path=my_images`` should train on ``my_images``, not on the preset's dataset.
When the user names a folder but no ``data.dataset``, :func:`inspect_folder` looks at the
folder (class sub-folders: ``imagefolder``; loose images: ``folder``; the files of a built-in data set
such as Fashion-MNIST's IDX files: left to the preset; nothing of these: a one-line error). With a
preset, :func:`folder_overrides` returns the overrides that make the preset train on it, with one
line saying what it found and what it changed; without one, :mod:`ibot.recipe` fits the whole recipe.
"""

from __future__ import annotations

from pathlib import Path

from ibot.data.datasets import IMG_EXTENSIONS, DatasetError, image_files, load_image, stratified_holdout
from ibot.data.hf import HFImageDataset, is_hf_path
from ibot.data.shards import ShardDataset, is_shard_path
from ibot.device import available_cores


def _images(folder: Path) -> list[str]:
    return image_files(folder)  # scanned once, cached


def inspect_folder(path: str | Path) -> dict | None:
    """What a folder holds: ``{"dataset", "root", "classes", "n_images", "has_val", "channels"}`` or None.

    ``imagefolder`` when it (or its ``train/``) has at least two sub-folders with images and no loose
    images; ``folder`` when it has images otherwise; None when it has none (or does not exist).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    base = root / "train" if (root / "train").is_dir() else root
    loose = [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    classes = {d.name: _images(d) for d in sorted(base.iterdir()) if d.is_dir()}
    classes = {c: files for c, files in classes.items() if files}
    if len(classes) >= 2 and not loose:
        files = [f for fs in classes.values() for f in fs]
        kind = "imagefolder"
    else:
        files = _images(root)
        kind = "folder"
    if not files:
        return None
    channels, side = _look(files)
    return {
        "dataset": kind,
        "root": str(root),
        "classes": sorted(classes) if kind == "imagefolder" else [],
        "n_images": len(files),
        "per_class": [len(v) for _, v in sorted(classes.items())] if kind == "imagefolder" else [],
        "has_val": (root / "val").is_dir(),
        "n_val": len(_images(root / "val")) if (root / "val").is_dir() else 0,
        "channels": channels,
        "median_side": side,
    }


def _look(files: list[str], sample: int = 64) -> tuple[int, int | None]:
    """(channels of the first readable image, median short side of up to ``sample`` images spread over
    the list); headers only, except the first image, which is decoded for its mode."""
    from PIL import Image

    channels, sides = 3, []
    for i, path in enumerate(files[:: max(1, len(files) // sample)][:sample]):
        try:
            if i == 0:
                channels = 1 if load_image(path).mode == "L" else 3
            with Image.open(path) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - an unreadable file: the others decide
            continue
    return channels, sorted(sides)[len(sides) // 2] if sides else None


DATASET_FILES = ("*-idx?-ubyte*", "data_batch_*", "cifar-*")  # built-in data sets' files, not an image folder


def check_has_images(path: str | Path) -> None:
    """A ``data.path`` with neither images nor a built-in data set's files is a one-line error."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder {str(path)!r} does not exist; pass data.path=/path/to/images")
    if inspect_folder(root) is None and not any(next(root.rglob(g), None) for g in DATASET_FILES):
        raise DatasetError(
            f"data.path={path} holds no images ({', '.join(IMG_EXTENSIONS)}); point it at a folder of images "
            "(class sub-folders, or loose images)"
        )


def describe_folder(info: dict, holdout: float) -> str:
    """What a folder holds and how it is split, in words (with the counts of each part)."""
    if info["dataset"] != "imagefolder":
        return f"a folder of {info['n_images']} unlabelled images (no class sub-folders: no k-NN evaluation)"
    n, k = info["n_images"], len(info["classes"])
    if info["has_val"]:
        return f"ImageFolder with {k} classes: {n} training images in train/, {info['n_val']} in val/ for evaluation"
    if holdout <= 0:
        return f"ImageFolder with {k} classes, {n} images (no val/ and data.holdout=0: no evaluation)"
    import torch

    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(info["per_class"])])
    held = len(stratified_holdout(labels, holdout, seed=0)[1])
    return f"ImageFolder with {k} classes, {n} images (no val/: {held} images, {holdout:.0%} of each class, held out)"


def folder_overrides(preset: dict, user: dict) -> tuple[dict, str | None]:
    """Overrides that make ``preset`` (flattened config) train on the folder in ``user['data.path']``.

    Args:
        preset: the flattened config the preset gives (``{"data.dataset": ..., ...}``).
        user: the user's flattened overrides.

    Returns:
        ``(overrides to add, message)``; ``({}, None)`` when nothing applies (no ``data.path``, an
        explicit ``data.dataset``, or the files of a built-in data set such as Fashion-MNIST's).

    Raises:
        DatasetError: the folder does not exist, or holds neither images nor a built-in data set.
    """
    if not user.get("data.path") or "data.dataset" in user:
        return {}, None
    if is_shard_path(user["data.path"]) or is_hf_path(user["data.path"]):
        return indexed_overrides(preset, user)
    info = inspect_folder(user["data.path"])
    if info is None:
        check_has_images(user["data.path"])  # a one-line error unless it holds a built-in data set's files
        return {}, None
    add: dict = {}
    if preset.get("data.dataset") != info["dataset"]:
        add["data.dataset"] = info["dataset"]
    if preset.get("data.pipeline") == "tensor" and "data.pipeline" not in user:
        add["data.pipeline"] = "auto"  # the tensor pipeline is for in-memory datasets
    if preset.get("model.in_chans") != info["channels"] and "model.in_chans" not in user:
        add["model.in_chans"] = info["channels"]
    cores = available_cores()
    if "data.num_workers" not in user and preset.get("data.num_workers", 0) > cores:
        add["data.num_workers"] = cores  # more workers than cores only slows the step (torch warns too)
    holdout = float(user.get("data.holdout", preset.get("data.holdout", 0.1)))
    n_train = info["n_images"]
    if info["dataset"] == "imagefolder" and not info["has_val"] and holdout > 0:
        import torch

        labels = torch.cat([torch.full((n,), i) for i, n in enumerate(info["per_class"])])
        n_train = len(stratified_holdout(labels, holdout, seed=0)[0])
    batch = int(user.get("optim.batch_size", preset.get("optim.batch_size", 1)))
    if "optim.batch_size" not in user and n_train < 8 * batch:
        add["optim.batch_size"] = batch = max(2, 1 << max(1, (n_train // 8).bit_length() - 1))
    changes = ", ".join(f"{k}={v}" for k, v in add.items()) or "nothing to change"
    return add, f"data.path={user['data.path']}: {describe_folder(info, holdout)}; set {changes}"


def indexed_overrides(preset: dict, user: dict) -> tuple[dict, str]:
    """:func:`folder_overrides` for WebDataset shards (a folder of ``.tar`` files or a brace pattern) and
    Hugging Face datasets on disk (``save_to_disk`` or Parquet folders)."""
    path = user["data.path"]
    kind = "wds" if is_shard_path(path) else "hf"
    if kind == "wds":
        ds = ShardDataset(path)
        found = f"{len(ds.shards)} WebDataset shard(s), {len(ds)} samples"
    else:
        ds = HFImageDataset(path, image_key=user.get("data.image_key"), label_key=user.get("data.label_key"))
        found = f"a Hugging Face dataset of {len(ds)} rows (image column {ds.image_key!r}, labels {ds.label_key!r})"
    add: dict = {"data.dataset": kind} if preset.get("data.dataset") != kind else {}
    if preset.get("data.pipeline") == "tensor" and "data.pipeline" not in user:
        add["data.pipeline"] = "auto"  # the tensor pipeline is for in-memory datasets
    first = next((item for item in (ds[i] for i in range(min(len(ds), 8))) if item is not None), None)
    channels = 1 if first is not None and first[0].mode == "L" else 3
    if preset.get("model.in_chans") != channels and "model.in_chans" not in user:
        add["model.in_chans"] = channels
    batch = int(user.get("optim.batch_size", preset.get("optim.batch_size", 1)))
    if "optim.batch_size" not in user and len(ds) < 8 * batch:
        add["optim.batch_size"] = max(2, 1 << max(1, (len(ds) // 8).bit_length() - 1))
    found += f", {len(ds.classes)} classes" if ds.classes else ", no labels (no k-NN evaluation)"
    changes = ", ".join(f"{k}={v}" for k, v in add.items()) or "nothing to change"
    return add, f"data.path={user['data.path']}: {found}; set {changes}"
