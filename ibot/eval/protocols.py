"""End-to-end evaluation protocols over any backbone source (what ``ibot knn`` / ``ibot linear`` run)."""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from ibot import distributed as D
from ibot.builders.data import dataset_from_config
from ibot.builders.sources import load_backbone
from ibot.config import to_dict
from ibot.data.datasets import DatasetError, build_dataset, spread_subset, validation_split
from ibot.device import resolve_device
from ibot.eval.baselines import BaselineCache, compute_baselines, pixel_encoder, untrained_backbone
from ibot.eval.knn import extract_features, extract_features_distributed, knn_classify
from ibot.eval.linear import DEFAULT_LRS, extract_linear_features, linear_accuracy, train_linear_sweep


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
        kw.update(streaming=bool(cfg["data"].get("streaming")) and name == "hf")  # a streamed run's k-NN sets
    return build_dataset(name, path, train=True, **kw), build_dataset(name, path, train=False, **kw), name


def _load(source, which, allow_unsafe, device, log):
    backbone, info, report = load_backbone(source, which, allow_unsafe)
    log(report)
    return backbone.to(device).eval(), info


def _encoder(backbone, pool: str):
    """The features ``ibot knn --pool`` reads from a backbone: its CLS, patch mean, or both."""

    def encode(x):
        cls, patches = backbone(x)
        if pool == "cls":
            return cls
        if pool == "patchmean":
            return patches.mean(1)
        return torch.cat([cls, patches.mean(1)], dim=-1)

    return encode


def _baseline_folder(source) -> Path | None:
    """Where a source's baselines are cached: its run (or export) folder; None for a file."""
    return Path(source) if Path(source).is_dir() else None


PIXEL_GB = 4.0  # the raw-pixel baseline is skipped when it would take more memory than this


def _pixels_skip(floats: int, what: str) -> str | None:
    """Why the raw-pixel baseline is skipped (``floats`` fp32 values of ``what`` would not fit), or None."""
    gb = floats * 4 / 2**30
    return f"its {what} would take {gb:.1f} GB" if gb > PIXEL_GB else None


def _eval_baselines(info, which, score, encoders, key, source, log, pixel_floats: int) -> dict:
    """The pixels and untrained baselines of ``ibot knn`` / ``ibot linear``: ``score(features)`` of the
    features ``encoders["pixels"]()`` and ``encoders["untrained"](backbone)`` extract; cached in the
    source's folder. ``pixel_floats``: the fp32 values the pixels baseline holds (skipped when too many)."""
    scores = {}
    if info.get("config"):
        key = {**key, "model": info["config"]["model"], "method": info["config"]["method"]}
        key["seed"], key["init_from"] = info["config"]["run"]["seed"], info["config"]["run"].get("init_from")
        scores["untrained"] = lambda: score(encoders["untrained"](untrained_backbone(info["config"], which)[0]))
    else:
        scores["untrained"] = (
            f"{source} has no run config (exported or official weights): no untrained model to compare"
        )
    scores["pixels"] = _pixels_skip(pixel_floats, "features") or (lambda: score(encoders["pixels"]()))
    return compute_baselines(scores, key, BaselineCache(_baseline_folder(source), log), log)


def _check_knn_args(ks, temperature) -> None:
    if not ks or min(ks) < 1:
        raise EvalError(f"k-NN needs every k >= 1 (got --ks {' '.join(map(str, ks))})")
    if temperature <= 0:
        raise EvalError(f"--temperature must be > 0 (got {temperature})")


def _knn_size(backbone, info, image_size) -> int:
    """The evaluation image size: ``--img-size`` (a multiple of the model's cell) or the model's."""
    size = image_size or info["img_size"]
    cell = getattr(backbone, "mask_cell", None) or info["patch_size"] or 1  # a Swin: its final-stage cell
    if size < 1 or size % cell:
        raise EvalError(f"--img-size {size} is not a positive multiple of the model's patch size {cell}")
    return size


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
    baselines=True,
) -> dict:
    """k-NN of a backbone (run folder, checkpoint, export or official file) on a labelled dataset.

    The memory bank is the train split, the queries the held-out split (see :func:`resolve_data`);
    ``limit`` keeps N images spread over each; ``progress`` shows bars on stderr. ``device``: "auto"
    (CUDA when available), "cpu", "cuda", "cuda:N"; features are extracted there (bf16 autocast on
    CUDA) and the neighbour search runs there too. ``baselines``: also score raw pixels and the
    untrained model the same way (``baselines`` of the result; :mod:`ibot.eval.baselines`).
    """
    _check_knn_args(ks, temperature)
    device = resolve_device(device)
    backbone, info = _load(source, which, allow_unsafe, device, log)
    size = _knn_size(backbone, info, image_size)
    train, test, name = resolve_data(info, dataset, data_path)
    train, test = spread_subset(train, limit), spread_subset(test, limit)
    log(f"k-NN: memory bank {train.split}; queries {test.split}")
    kw = dict(image_size=size, in_chans=info["in_chans"], device=device, batch_size=batch_size)
    kw.update(num_workers=num_workers, progress=progress)

    def features(encode, what="k-NN"):
        bank = extract_features(encode, train, desc=f"{what} bank features", **kw)
        return bank, extract_features(encode, test, desc=f"{what} query features", **kw)

    def score(feats) -> dict:
        (tr_f, tr_y), (te_f, te_y) = feats
        c = len(getattr(train, "classes", [])) or None
        acc = knn_classify(tr_f, tr_y, te_f, te_y, ks=ks, temperature=temperature, num_classes=c, device=device)
        return {str(k): {"top1": a, "top5": b} for k, (a, b) in acc.items()}

    # bf16 features on CUDA are not the CPU's fp32 ones: the device type is part of the key
    ids = (_dataset_id(train), _dataset_id(test))
    key = fingerprint(backbone, name, size, pool, device.type, *ids)
    feats = _cached(cache, key, lambda: features(_encoder(backbone, pool)), log)
    res = {"dataset": name, "pool": pool, "which": which, "device": str(device)}
    res.update(n_train=len(feats[0][1]), n_test=len(feats[1][1]), split=test.split, knn=score(feats))
    if baselines:
        encoders = {
            "pixels": lambda: features(pixel_encoder, "pixels"),
            "untrained": lambda b: features(_encoder(b.to(device).eval(), pool), "untrained"),
        }
        bkey = {"protocol": "knn", "ks": list(ks), "T": temperature, "pool": pool, "img_size": size}
        bkey.update(device=device.type, data=[name, *ids], split=test.split)
        floats = (len(train) + len(test)) * info["in_chans"] * size**2
        res["baselines"] = _eval_baselines(info, which, score, encoders, bkey, source, log, floats)
    return res


def pretrain_split(cfg, bank_set, log=print):
    """``(bank, queries, description)`` of a pretraining run's k-NN, or None (logged) when there is
    nothing labelled to evaluate on; see :func:`pretrain_knn`."""
    d = cfg.data
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
    return bank, test_set, split


def _pretrain_accuracy(encode, cfg, bank, test_set, *, device, autocast, extract=extract_features_distributed):
    """``(knn_classify result, n_train, n_test)`` of ``encode`` with the run's k-NN settings; None off the
    main rank."""
    m = cfg.model
    kw = dict(image_size=m.img_size, in_chans=m.in_chans, device=device, num_workers=cfg.data.num_workers)
    kw["progress"] = cfg.run.progress and D.is_main()
    kw["amp"] = autocast is None  # a run's precision context alone decides (fp32 stays fp32)
    with autocast or nullcontext():
        tr_f, tr_y = extract(encode, bank, **kw, desc="k-NN bank features")
        te_f, te_y = extract(encode, test_set, **kw, desc="k-NN query features")
    ks = sorted({10, 20, 100, 200, cfg.run.knn_k})
    c = len(getattr(bank, "classes", [])) or None
    # under torchrun (features extracted on every rank) each rank searches its share of the bank on its own
    # device and the top-k are merged: no rank waits in a collective while another searches the whole bank;
    # a main-rank-only call (the baselines: ``extract=extract_features``) searches the whole bank itself
    every_rank = D.is_dist() and extract is extract_features_distributed
    shard = (D.rank(), D.world_size()) if every_rank else None
    t = cfg.run.knn_temperature
    acc = knn_classify(tr_f, tr_y, te_f, te_y, ks=ks, temperature=t, num_classes=c, device=device, shard=shard)
    if not D.is_main():
        return None
    return acc, tr_f.shape[0], te_f.shape[0]


def pretrain_knn(
    backbone, cfg, bank_set, *, device, autocast=None, log=print, extra: dict | None = None
) -> dict | None:
    """k-NN of a pretraining run's backbone CLS (what ``ibot pretrain`` reports every ``run.knn_every``
    epochs and at the end), on every rank under torchrun (features are extracted in rank shards).

    The memory bank is ``bank_set`` (the training split; ``run.knn_split=val``: its held-out
    validation part is the queries and the rest the bank), else the queries are the dataset's test
    split; ``run.knn_train_limit`` keeps that many bank images spread over it. ``autocast``: the
    context the features are extracted under, and the only one (``run.precision=fp32``: fp32, not the
    bf16 of ``ibot knn``). Returns ``k``, ``top1``, ``top5``, ``n_train``, ``n_test``, ``extra`` (e.g.
    epoch and step), ``all`` (every k), ``seconds`` and ``split`` on the main rank; None on the others,
    and when there is nothing labelled to evaluate on (logged). Under torchrun each rank searches its
    share of the bank on its ``device`` and the ranks' top-k are merged.
    """
    sets = pretrain_split(cfg, bank_set, log)
    if sets is None:
        return None
    bank, test_set, split = sets
    backbone.eval()
    t0 = time.time()
    out = _pretrain_accuracy(backbone.forward_cls, cfg, bank, test_set, device=device, autocast=autocast)
    if out is None:
        return None
    acc, n_train, n_test = out
    k = min(cfg.run.knn_k, n_train)
    top1, top5 = acc[k]
    return {
        "k": k,
        "top1": top1,
        "top5": top5,
        "n_train": n_train,
        "n_test": n_test,
        **(extra or {}),
        "all": {str(kk): v for kk, v in acc.items()},
        "seconds": time.time() - t0,
        "split": split,
    }


def pretrain_baselines(cfg, bank_set, *, device, autocast=None, log=print, folder=None) -> dict | None:
    """Raw pixels and the untrained model (:mod:`ibot.eval.baselines`) scored as :func:`pretrain_knn`
    scores the run (same bank, queries, k and temperature), on the main rank (None on the others and
    when there is nothing to evaluate on); cached in ``folder/baselines.json``.
    """
    if not D.is_main():
        return None
    sets = pretrain_split(cfg, bank_set, lambda m: None)
    if sets is None:
        return None
    bank, test_set, split = sets
    m = cfg.model

    def score(encode) -> dict:
        acc, _, _ = _pretrain_accuracy(
            encode, cfg, bank, test_set, device=device, autocast=autocast, extract=extract_features
        )
        k = min(cfg.run.knn_k, len(bank))
        k = max(kk for kk in acc if kk <= k)
        return {"k": k, "top1": acc[k][0], "top5": acc[k][1], "all": {str(kk): list(v) for kk, v in acc.items()}}

    def untrained() -> dict:
        backbone, _ = untrained_backbone(to_dict(cfg))
        return score(backbone.to(device).eval().forward_cls)

    why = _pixels_skip((len(bank) + len(test_set)) * m.in_chans * m.img_size**2, "features")
    key = {"protocol": "knn", "pool": "cls", "ks": sorted({10, 20, 100, 200, cfg.run.knn_k}), "k": cfg.run.knn_k}
    key.update(T=cfg.run.knn_temperature, img_size=m.img_size, device=device.type, split=split)
    key.update(data=[_dataset_id(bank), _dataset_id(test_set)], model=to_dict(cfg)["model"], method=cfg.method)
    key.update(seed=cfg.run.seed, init_from=cfg.run.init_from)
    scores = {"untrained": untrained, "pixels": why or (lambda: score(pixel_encoder))}
    return compute_baselines(scores, key, BaselineCache(folder, log), log)


def _linear_probe(tr_x, tr_y, te_x, te_y, classes, *, val_fraction, epochs, seed, progress) -> dict:
    """The lr sweep fitted on the train features minus a seeded validation split, picked on it, tested once."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(tr_x.shape[0], generator=gen)
    n_val = max(1, int(round(val_fraction * tr_x.shape[0])))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    c = classes or int(max(tr_y.max(), te_y.max())) + 1
    best_lr, w, b, sweep = train_linear_sweep(
        tr_x[fit_idx], tr_y[fit_idx], tr_x[val_idx], tr_y[val_idx], c, epochs=epochs, seed=seed, progress=progress
    )
    top1, top5 = linear_accuracy(w, b, te_x, te_y)
    return {
        "best_lr": best_lr,
        "n_lrs": len(sweep),
        "val_top1": sweep[best_lr],
        "top1": top1,
        "top5": top5,
        "n_fit": len(fit_idx),
        "n_val": n_val,
    }


def _pixel_pair(train, test, **kw):
    """The raw-pixel features of the linear probe's train and test splits."""
    tr = extract_features(pixel_encoder, train, desc="pixels train features", **kw)
    return tr, extract_features(pixel_encoder, test, desc="pixels test features", **kw)


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
    baselines=True,
) -> dict:
    """Linear probe: lr sweep trained on train minus a validation split, picked on it, tested once
    on the held-out split (see :func:`resolve_data`); ``limit`` keeps N images spread over each split.

    ``device`` as :func:`run_knn` (the features are extracted there; the small sweep runs on the CPU).
    ``baselines``: the same probe of raw pixels and of the untrained model (see :func:`run_knn`).
    """
    device = resolve_device(device)
    backbone, info = _load(source, which, allow_unsafe, device, log)
    train, test, name = resolve_data(info, dataset, data_path)
    train, test = spread_subset(train, limit), spread_subset(test, limit)
    log(f"linear probe: fitted on {train.split}; tested on {test.split}")
    ids = (_dataset_id(train), _dataset_id(test))
    key = fingerprint(backbone, "linear", name, n_last_blocks, avgpool, device.type, *ids)
    kw = dict(image_size=info["img_size"], device=device, batch_size=batch_size)
    kw.update(num_workers=num_workers, progress=progress)

    def features(model, what="linear"):
        lkw = dict(n_last_blocks=n_last_blocks, avgpool=avgpool, **kw)
        tr = extract_linear_features(model, train, desc=f"{what} train features", **lkw)
        return tr, extract_linear_features(model, test, desc=f"{what} test features", **lkw)

    def score(feats) -> dict:
        (tr_x, tr_y), (te_x, te_y) = feats
        classes = len(getattr(train, "classes", []))
        return _linear_probe(
            tr_x, tr_y, te_x, te_y, classes, val_fraction=val_fraction, epochs=epochs, seed=seed, progress=progress
        )

    probe = score(_cached(cache, key, lambda: features(backbone), log))
    res = {"dataset": name, "which": which, "device": str(device), "n_last_blocks": n_last_blocks}
    res.update(avgpool=avgpool, test_top1=probe.pop("top1"), test_top5=probe.pop("top5"), **probe)
    res.update(n_test=len(test), split=test.split)
    if baselines:
        pixels = partial(_pixel_pair, train, test, in_chans=info["in_chans"], **kw)
        encoders = {"pixels": pixels, "untrained": lambda b: features(b.to(device).eval(), "untrained")}
        bkey = {"protocol": "linear", "n_last_blocks": n_last_blocks, "avgpool": avgpool, "epochs": epochs}
        bkey.update(val_fraction=val_fraction, probe_seed=seed, img_size=info["img_size"], device=device.type)
        bkey.update(data=[name, *ids], split=test.split)
        # the features, and the sweep's weights, momenta and gradients (3 x lrs x pixels x classes)
        rows = len(train) + len(test) + len(DEFAULT_LRS) * 3 * max(len(getattr(train, "classes", [])), 2)
        floats = rows * info["in_chans"] * info["img_size"] ** 2
        res["baselines"] = _eval_baselines(info, which, score, encoders, bkey, source, log, floats)
    return res


__all__ = ["fingerprint", "pretrain_baselines", "pretrain_knn", "pretrain_split", "run_knn", "run_linear"]
