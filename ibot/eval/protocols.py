"""End-to-end evaluation protocols over any backbone source (what ``ibot knn`` / ``ibot linear`` run)."""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ibot import distributed as D
from ibot.builders.data import dataset_from_config
from ibot.builders.sources import load_backbone
from ibot.data.datasets import DatasetError, build_dataset, spread_subset, validation_split
from ibot.device import resolve_device
from ibot.eval.knn import extract_features, extract_features_distributed, knn_classify
from ibot.eval.linear import extract_linear_features, linear_accuracy, train_linear_sweep


def fingerprint(backbone: torch.nn.Module, *parts) -> str:
    """Hash of the backbone weights and the evaluation settings (cache key)."""
    h = hashlib.sha256()
    for k, v in backbone.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:32]


def _dataset_id(ds) -> tuple:
    labels = getattr(ds, "labels", None)
    lab = hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16] if labels is not None else ""
    first = ds.images[:4].float().sum().item() if hasattr(ds, "images") else getattr(ds, "root", "")
    return (type(ds).__name__, len(ds), lab, str(first), getattr(ds, "split", ""))


class EvalError(ValueError):
    """An evaluation argument cannot work; the message says which and what to pass."""


def _cached(cache: str | None, key: str, compute, log=print):
    if cache:
        path = Path(cache)
        if path.is_dir():
            raise EvalError(f"--cache {path} is a folder; pass a file name (e.g. {path / 'features.pt'})")
        if path.is_file():
            try:
                blob = torch.load(path, weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable cache is recomputed
                blob = None
                log(f"features: cache {path} is unreadable ({type(err).__name__}); recomputing it")
            if isinstance(blob, dict) and blob.get("key") == key and "value" in blob:
                log(f"features: reusing cache {path}")
                return blob["value"]
            if blob is not None:
                log(f"features: cache {path} was made for another model or data; recomputing")
    value = compute()
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "value": value}, cache)
    return value


def resolve_data(info: dict, dataset: str | None, data_path: str | None):
    """(train split, held-out split, dataset name) of the source's dataset or the one named.

    The held-out split never overlaps the train split: an ImageFolder without ``val/`` is split
    as for pretraining (the run's ``data.holdout``, else 10% of each class, fixed seed); each
    returned dataset's ``split`` says which images it holds.
    """
    cfg = info.get("config")
    name = dataset or (cfg["data"]["dataset"] if cfg else None)
    path = data_path or (cfg["data"]["path"] if cfg else None)
    if not name:
        raise DatasetError("say which dataset to evaluate on: --dataset NAME [--data PATH]")
    if name == "folder":
        raise DatasetError(
            f"{path} is an unlabelled folder (data.dataset=folder); evaluation needs class sub-folders: "
            "--dataset imagefolder --data DIR"
        )
    kw = dict(image_size=info["img_size"], in_chans=info["in_chans"])
    if cfg:
        kw.update(synthetic_size=cfg["data"]["synthetic_size"], seed=cfg["run"]["seed"])
        kw.update(holdout=cfg["data"].get("holdout", 0.1))
        if not data_path:  # the run's evaluation shards go with the run's data
            kw.update(val_path=cfg["data"].get("val_path"))
        kw.update(image_key=cfg["data"].get("image_key"), label_key=cfg["data"].get("label_key"))
    return build_dataset(name, path, train=True, **kw), build_dataset(name, path, train=False, **kw), name


def run_knn(
    source,
    *,
    which="teacher",
    dataset=None,
    data_path=None,
    ks=(10, 20, 100, 200),
    temperature=0.07,
    pool="cls",
    cache=None,
    image_size=None,
    device="auto",
    log=print,
    allow_unsafe=False,
    batch_size=256,
    num_workers=0,
    limit=0,
    progress=False,
) -> dict:
    """k-NN of a backbone (run folder, checkpoint, export or official file) on a labelled dataset.

    The memory bank is the train split, the queries the held-out split (see :func:`resolve_data`);
    ``limit`` keeps N images spread over each; ``progress`` shows bars on stderr. ``device``: "auto"
    (CUDA when available), "cpu", "cuda", "cuda:N"; features are extracted there (bf16 autocast on
    CUDA) and the neighbour search runs there too.
    """
    if not ks or min(ks) < 1:
        raise EvalError(f"k-NN needs every k >= 1 (got --ks {' '.join(map(str, ks))})")
    if temperature <= 0:
        raise EvalError(f"--temperature must be > 0 (got {temperature})")
    device = resolve_device(device)
    backbone, info, report = load_backbone(source, which, allow_unsafe)
    log(report)
    backbone = backbone.to(device).eval()
    size = image_size or info["img_size"]
    cell = getattr(backbone, "mask_cell", None) or info["patch_size"] or 1  # a Swin: its final-stage cell
    if size < 1 or size % cell:
        raise EvalError(f"--img-size {size} is not a positive multiple of the model's patch size {cell}")
    train, test, name = resolve_data(info, dataset, data_path)
    train, test = spread_subset(train, limit), spread_subset(test, limit)
    log(f"k-NN: memory bank {train.split}; queries {test.split}")

    def encode(x):
        cls, patches = backbone(x)
        if pool == "cls":
            return cls
        if pool == "patchmean":
            return patches.mean(1)
        return torch.cat([cls, patches.mean(1)], dim=-1)

    # bf16 features on CUDA are not the CPU's fp32 ones: the device type is part of the key
    key = fingerprint(backbone, name, size, pool, device.type, _dataset_id(train), _dataset_id(test))

    def compute():
        kw = dict(image_size=size, in_chans=info["in_chans"], device=device, batch_size=batch_size)
        kw.update(num_workers=num_workers, progress=progress)
        return (
            extract_features(encode, train, desc="k-NN bank features", **kw),
            extract_features(encode, test, desc="k-NN query features", **kw),
        )

    (tr_f, tr_y), (te_f, te_y) = _cached(cache, key, compute, log)
    acc = knn_classify(
        tr_f,
        tr_y,
        te_f,
        te_y,
        ks=ks,
        temperature=temperature,
        num_classes=len(getattr(train, "classes", [])) or None,
        device=device,
    )
    return {
        "dataset": name,
        "pool": pool,
        "which": which,
        "device": str(device),
        "n_train": len(tr_y),
        "n_test": len(te_y),
        "split": test.split,
        "knn": {str(k): {"top1": a, "top5": b} for k, (a, b) in acc.items()},
    }


def pretrain_knn(
    backbone, cfg, bank_set, *, device, autocast=None, log=print, extra: dict | None = None
) -> dict | None:
    """k-NN of a pretraining run's backbone CLS (what ``ibot pretrain`` reports every ``run.knn_every``
    epochs and at the end), on every rank under torchrun (features are extracted in rank shards).

    The memory bank is ``bank_set`` (the training split; ``run.knn_split=val``: its held-out
    validation part is the queries and the rest the bank), else the queries are the dataset's test
    split; ``run.knn_train_limit`` keeps that many bank images spread over it. ``autocast``: the
    context the features are extracted under (the run's precision). Returns ``k``, ``top1``,
    ``top5``, ``n_train``, ``n_test``, ``extra`` (e.g. epoch and step), ``all`` (every k),
    ``seconds`` and ``split`` on the main rank; None on the others, and when there is nothing
    labelled to evaluate on (logged).
    """
    d, m = cfg.data, cfg.model
    bank = bank_set
    try:
        if d.dataset == "folder":
            log("k-NN skipped: data.dataset=folder has no labels")
            return None
        if cfg.run.knn_split == "val":
            bank, test_set = validation_split(bank_set)
            split = test_set.split
        else:
            test_set = dataset_from_config(cfg, train=False)
            split = getattr(test_set, "split", f"the {d.dataset} test split")
    except DatasetError as err:
        log(f"k-NN skipped: no labelled held-out images ({err})")
        return None
    if cfg.run.knn_train_limit:  # spread over the bank: a class-sorted folder keeps every class
        bank = spread_subset(bank, cfg.run.knn_train_limit)
    backbone.eval()
    t0 = time.time()
    kw = dict(image_size=m.img_size, in_chans=m.in_chans, device=device, num_workers=d.num_workers)
    kw["progress"] = cfg.run.progress and D.is_main()
    with autocast or nullcontext():
        tr_f, tr_y = extract_features_distributed(backbone.forward_cls, bank, **kw, desc="k-NN bank features")
        te_f, te_y = extract_features_distributed(backbone.forward_cls, test_set, **kw, desc="k-NN query features")
    if not D.is_main():
        return None
    ks = sorted({10, 20, 100, 200, cfg.run.knn_k})
    acc = knn_classify(
        tr_f,
        tr_y,
        te_f,
        te_y,
        ks=ks,
        temperature=cfg.run.knn_temperature,
        num_classes=len(getattr(bank, "classes", [])) or None,
    )
    k = min(cfg.run.knn_k, tr_f.shape[0])
    top1, top5 = acc[k]
    return {
        "k": k,
        "top1": top1,
        "top5": top5,
        "n_train": tr_f.shape[0],
        "n_test": te_f.shape[0],
        **(extra or {}),
        "all": {str(kk): v for kk, v in acc.items()},
        "seconds": time.time() - t0,
        "split": split,
    }


def run_linear(
    source,
    *,
    which="teacher",
    dataset=None,
    data_path=None,
    n_last_blocks=4,
    avgpool=False,
    val_fraction=0.1,
    epochs=30,
    cache=None,
    device="auto",
    log=print,
    allow_unsafe=False,
    seed=0,
    batch_size=256,
    num_workers=0,
    limit=0,
    progress=False,
) -> dict:
    """Linear probe: lr sweep trained on train minus a validation split, picked on it, tested once
    on the held-out split (see :func:`resolve_data`); ``limit`` keeps N images spread over each split.

    ``device`` as :func:`run_knn` (the features are extracted there; the small sweep runs on the CPU).
    """
    device = resolve_device(device)
    backbone, info, report = load_backbone(source, which, allow_unsafe)
    log(report)
    backbone = backbone.to(device).eval()
    train, test, name = resolve_data(info, dataset, data_path)
    train, test = spread_subset(train, limit), spread_subset(test, limit)
    log(f"linear probe: fitted on {train.split}; tested on {test.split}")
    key = fingerprint(
        backbone, "linear", name, n_last_blocks, avgpool, device.type, _dataset_id(train), _dataset_id(test)
    )

    def compute():
        kw = dict(image_size=info["img_size"], n_last_blocks=n_last_blocks, avgpool=avgpool, device=device)
        kw.update(batch_size=batch_size, num_workers=num_workers, progress=progress)
        return (
            extract_linear_features(backbone, train, desc="linear train features", **kw),
            extract_linear_features(backbone, test, desc="linear test features", **kw),
        )

    (tr_x, tr_y), (te_x, te_y) = _cached(cache, key, compute, log)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(tr_x.shape[0], generator=gen)
    n_val = max(1, int(round(val_fraction * tr_x.shape[0])))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    c = len(getattr(train, "classes", [])) or int(max(tr_y.max(), te_y.max())) + 1
    best_lr, w, b, sweep = train_linear_sweep(
        tr_x[fit_idx], tr_y[fit_idx], tr_x[val_idx], tr_y[val_idx], c, epochs=epochs, seed=seed, progress=progress
    )
    top1, top5 = linear_accuracy(w, b, te_x, te_y)
    return {
        "dataset": name,
        "which": which,
        "device": str(device),
        "n_last_blocks": n_last_blocks,
        "avgpool": avgpool,
        "best_lr": best_lr,
        "val_top1": sweep[best_lr],
        "test_top1": top1,
        "test_top5": top5,
        "n_fit": len(fit_idx),
        "n_val": n_val,
        "n_test": len(te_y),
        "split": test.split,
    }


__all__ = ["fingerprint", "run_knn", "run_linear"]
