"""``data.path=DIR`` alone: recognise what the folder holds and fit the config to it.

``ibot pretrain data.path=my_images`` should train on ``my_images``, not on the preset's dataset.
When the user names a folder but no ``data.dataset``, :func:`inspect_data` looks at it (class
sub-folders: ``imagefolder``; loose images: ``folder``; WebDataset shards: ``wds``; a Hugging Face
dataset, or any ``data.path`` with ``data.streaming=true``: ``hf``; the files of a built-in data set
such as Fashion-MNIST's IDX files: left to the preset; nothing of these: a one-line error) and says
what it holds in one ``info`` dict (images, classes, channels, median short side, evaluation split)
whatever the format. With a preset, :func:`folder_overrides` returns the overrides that make the
preset train on it, with one line saying what it found and what it changed; without one,
:mod:`ibot.recipe` fits the whole recipe to the ``info``.
"""

from __future__ import annotations

import json
from io import BytesIO
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
    channels, side = _look(len(files), files.__getitem__)
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


def _look(n: int, source, sample: int = 64) -> tuple[int, int | None]:
    """(channels of the first readable image, median short side of up to ``sample`` of ``n`` items spread
    evenly over them); ``source(i)``: item ``i``'s path or encoded bytes. Headers only, except the first
    image, which is decoded for its mode."""
    from PIL import Image

    channels, sides = 3, []
    for k, i in enumerate(range(0, n, max(1, n // sample))[:sample]):
        try:
            item = source(i)
            item = BytesIO(item) if isinstance(item, bytes) else item
            if k == 0:
                channels = 1 if load_image(item).mode == "L" else 3
                if isinstance(item, BytesIO):
                    item.seek(0)
            with Image.open(item) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - an unreadable item: the others decide
            continue
    return channels, sorted(sides)[len(sides) // 2] if sides else None


def inspect_data(path: str | Path, user: dict | None = None) -> dict | None:
    """:func:`inspect_folder` for any ``data.path``: WebDataset shards and Hugging Face datasets (streamed
    with ``data.streaming=true``) give the same ``info`` (``dataset`` ``wds`` / ``hf``; ``found``: what it
    is, in words; ``labelled``); None when it holds no images."""
    user = user or {}
    if user.get("data.streaming") or is_hf_path(path):
        return _indexed_info(path, user, "hf")
    if is_shard_path(path):
        return _indexed_info(path, user, "wds")
    return inspect_folder(path)


VAL_SPLITS = ("validation", "val", "test")  # a DatasetDict's split that evaluates (data.val_path=split:NAME)


def _indexed_info(path, user: dict, kind: str) -> dict:
    """The ``info`` of shards (their index) or a Hugging Face dataset (its rows, or a stream's declared
    row count and first rows): images, classes, and a spread sample of their sides and channels."""
    keys = dict(image_key=user.get("data.image_key"), label_key=user.get("data.label_key"))
    val_split = None
    if kind == "wds":
        ds = ShardDataset(path)
        n, classes, labelled = len(ds), list(ds.classes), bool(ds.classes)
        found = f"{len(ds.shards)} WebDataset shard(s), {n} samples"
    elif user.get("data.streaming"):
        from ibot.data.hf_stream import StreamSource

        ds = StreamSource(path, **keys)
        n, classes, labelled = ds.num_rows, ds.classes, bool(ds.label_key)
        found = f"a streamed Hugging Face dataset of {n or 'an undeclared number of'} rows"
        found += f" (image column {ds.image_key!r}, labels {ds.label_key!r})"
    else:
        ds = HFImageDataset(path, **keys)
        n, classes, labelled = len(ds), list(ds.classes), bool(ds.classes)
        found = f"a Hugging Face dataset of {n} rows (image column {ds.image_key!r}, labels {ds.label_key!r})"
        val_split = _val_split(path)
    channels, side = _look_indexed(ds, n, kind, user)
    return {
        "dataset": kind,
        "root": str(path),
        "found": found,
        "classes": classes,
        "labelled": labelled,
        "n_images": n,
        "per_class": [],
        "has_val": bool(user.get("data.val_path")),
        "val_split": None if user.get("data.val_path") else val_split,
        "n_val": 0,
        "channels": channels,
        "median_side": side,
    }


def _look_indexed(ds, n, kind: str, user: dict) -> tuple[int, int | None]:
    """:func:`_look` of shards or map-style rows (spread over them); of a stream, its first 64 rows."""
    if kind == "hf" and user.get("data.streaming"):
        rows = next(iter(ds.rows().iter(batch_size=64)), {"image": []})["image"]
        return _look(len(rows), rows.__getitem__)
    return _look(n, lambda i: ds.read_bytes(i)[0])


def _val_split(path) -> str | None:
    """The evaluation split of a ``save_to_disk`` DatasetDict (validation / val / test), or None."""
    try:
        splits = json.loads((Path(str(path)).expanduser() / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((s for s in VAL_SPLITS if s in splits), None)


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
    """What a folder (or shards, or a Hugging Face dataset) holds and how it is split, in words."""
    if info["dataset"] in ("wds", "hf"):
        labels = f"{len(info['classes'])} classes" if info["classes"] else "labels"
        if not info.get("labelled"):
            return f"{info['found']}, no labels (no k-NN evaluation)"
        if info["has_val"] or info.get("val_split"):
            return f"{info['found']}, {labels}; data.val_path evaluates"
        held = f"{holdout:.0%} of the keys (hashed) held out" if holdout > 0 else "data.holdout=0: no evaluation"
        return f"{info['found']}, {labels}; {held}"
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


def folder_overrides(preset: dict, user: dict, info: dict | None = None) -> tuple[dict, str | None]:
    """Overrides that make ``preset`` (flattened config) train on the folder in ``user['data.path']``.

    Args:
        preset: the flattened config the preset gives (``{"data.dataset": ..., ...}``).
        user: the user's flattened overrides.
        info: :func:`inspect_data` of ``user['data.path']``, when the caller has it.

    Returns:
        ``(overrides to add, message)``; ``({}, None)`` when nothing applies (no ``data.path``, an
        explicit ``data.dataset``, or the files of a built-in data set such as Fashion-MNIST's).

    Raises:
        DatasetError: the folder does not exist, or holds neither images nor a built-in data set.
    """
    if not user.get("data.path") or "data.dataset" in user:
        return {}, None
    info = info or inspect_data(user["data.path"], user)
    if info is not None and info["dataset"] in ("wds", "hf"):
        return indexed_overrides(preset, user, info)
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


def indexed_overrides(preset: dict, user: dict, info: dict | None = None) -> tuple[dict, str]:
    """:func:`folder_overrides` for WebDataset shards (a folder of ``.tar`` files or a brace pattern) and
    Hugging Face datasets (``save_to_disk`` or Parquet folders; any path with ``data.streaming=true``)."""
    info = info or inspect_data(user["data.path"], user)
    kind, n = info["dataset"], info["n_images"]
    add: dict = {"data.dataset": kind} if preset.get("data.dataset") != kind else {}
    if preset.get("data.pipeline") == "tensor" and "data.pipeline" not in user:
        add["data.pipeline"] = "auto"  # the tensor pipeline is for in-memory datasets
    if preset.get("model.in_chans") != info["channels"] and "model.in_chans" not in user:
        add["model.in_chans"] = info["channels"]
    batch = int(user.get("optim.batch_size", preset.get("optim.batch_size", 1)))
    if "optim.batch_size" not in user and n is not None and n < 8 * batch:
        add["optim.batch_size"] = max(2, 1 << max(1, (n // 8).bit_length() - 1))
    found = info["found"] + (f", {len(info['classes'])} classes" if info["classes"] else "")
    found += "" if info["labelled"] else ", no labels (no k-NN evaluation)"
    changes = ", ".join(f"{k}={v}" for k, v in add.items()) or "nothing to change"
    return add, f"data.path={user['data.path']}: {found}; set {changes}"
