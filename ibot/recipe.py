"""``ibot pretrain data.path=DIR`` with no preset: a recipe fitted to the folder and to the machine.

A folder of a few hundred 300-px photos on a 2-core CPU and 100k images on a GPU need different
runs. :func:`fit_recipe` reads what :func:`ibot.data_setup.inspect_data` found (images, classes,
median short side, channels; the same for an image folder, WebDataset shards or a Hugging Face
dataset) and the :class:`Machine`, and returns one :class:`Fit` per key (its value and why).
:func:`resolve_pretrain_config` is the one code path of ``ibot pretrain`` and ``ibot config``:
preset, folder fit, then the user's keys, which always win.

The small (CPU) recipe is the ``fmnist_tiny`` recipe that was measured on Fashion-MNIST (KoLeo 2.0,
patch loss 2x, sharp constant teacher temperatures; benchmarks/README.md), at the folder's
resolution with an 8x8 patch grid and 4 local crops; the large (GPU) recipe is the official
ViT-S/16 one. Epochs come from a time budget (:data:`BUDGET_MIN`) and a cost model of the step
(:func:`images_per_second`), calibrated on this project's 2-core VM against a hand-set 64-px run
(56 images/s); ``benchmarks/own_folder.py`` then measured 52-63 images/s where it estimated 46-48, so
a folder run uses about 80% of its budget (conservative, not tuned after the fact).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

SIZE_LADDER = (32, 48, 64, 96, 112, 128, 160, 224)  # global crop sizes a folder is snapped to
MAX_SIZE = {"cpu": 64, "cuda": 224}  # largest global crop per device: a 96-px step costs about 2.5x the FLOPs of 64
BUDGET_MIN = {"cpu": 10.0, "cuda": 60.0}  # default training minutes of a folder run (run.time_limit_min overrides)
CPU_GFLOPS_PER_CORE = 55.0  # effective fp32 GFLOP/s of one core in a training step (calibrated, see module doc)
CPU_AUG_SECONDS = 0.0015  # PIL decode + augmentation of one crop on one core (calibrated)
GPU_GFLOPS = 150_000.0  # a sustained bf16 rate for one modern data-centre GPU (an estimate, not measured here)


@dataclass(frozen=True)
class Machine:
    """What the run will train on: ``device`` ("cpu" or "cuda"), CPU ``cores``, ``processes`` (torchrun)."""

    device: str
    cores: int
    processes: int = 1

    @classmethod
    def detect(cls, run_device: str = "auto") -> Machine:
        import torch

        from ibot.device import available_cores

        cuda = run_device.startswith("cuda") or (run_device == "auto" and torch.cuda.is_available())
        return cls("cuda" if cuda else "cpu", available_cores(), int(os.environ.get("WORLD_SIZE", 1)))


@dataclass(frozen=True)
class Fit:
    """One fitted key: its value and the reason, as printed before training."""

    key: str
    value: Any
    why: str


def snap_size(side: int, device: str) -> int:
    """The largest ladder size <= the images' median short side, at least 32, at most the device's cap."""
    fits = [s for s in SIZE_LADDER if s <= max(side, SIZE_LADDER[0]) and s <= MAX_SIZE[device]]
    return fits[-1]


def patch_for(size: int) -> int:
    """The ViT patch giving an 8-14 cell grid per side (8 below 96 px, where fewer cells cost too much)."""
    return size // 8 if size <= 64 else (8 if size <= 112 else 16)


def vit_gflops(size: int, patch: int, width: int, depth: int, head_flops_per_token: float, in_chans: int) -> float:
    """GFLOPs of one forward of a ViT (and the head on every token) on one ``size`` crop."""
    tokens = (size // patch) ** 2 + 1
    embed = 2 * (size // patch) ** 2 * patch * patch * in_chans * width
    blocks = depth * (tokens * 24 * width**2 + 4 * tokens**2 * width)
    return (embed + blocks + tokens * head_flops_per_token) / 1e9


def step_gflops_per_image(fl: dict, in_chans: int) -> float:
    """GFLOPs per image of one training step: student forward + backward (3x) on every crop, teacher on the globals."""
    hidden, bottleneck, k = fl["model.hidden_dim"], fl["model.bottleneck_dim"], fl["model.out_dim"]
    width = fl["model.embed_dim"]
    head = 2 * (width * hidden + hidden * hidden + hidden * bottleneck + bottleneck * k)
    args = (fl["model.patch_size"], width, fl["model.depth"], head, in_chans)
    g = vit_gflops(fl["model.img_size"], *args)
    loc = vit_gflops(fl["data.local_crop_size"], *args) if fl["data.local_crops_number"] else 0.0
    return 3 * (2 * g + fl["data.local_crops_number"] * loc) + 2 * g


def images_per_second(fl: dict, in_chans: int, machine: Machine) -> float:
    """Estimated training images per second of the recipe ``fl`` on ``machine`` (all processes)."""
    gflops = step_gflops_per_image(fl, in_chans)
    if machine.device == "cuda":
        return machine.processes * GPU_GFLOPS / gflops
    cores = machine.cores * machine.processes
    return cores / (gflops / CPU_GFLOPS_PER_CORE + CPU_AUG_SECONDS * (2 + fl["data.local_crops_number"]))


# The small recipe (CPU, or a GPU with few images) is the fmnist_tiny preset's, which was measured; the
# large one the vit_small_in1k preset's (the official ViT-S/16 recipe); both read from the presets.
RECIPE_KEYS = (  # what a folder run takes from its base preset; sizes and schedules are fitted below
    "model.arch",  # the timm template; width, depth and heads are fitted
    "model.drop_path",
    "model.efficient_drop_path",
    "model.shared_head",
    "model.norm_last_layer",
    "mask.shape",
    "mask.ratio",
    "mask.ratio_var",
    "loss.teacher_temp",
    "loss.teacher_patch_temp",
    "loss.koleo_weight",
    "loss.lambda2",
    "data.global_crops_scale",
    "data.local_crops_scale",
    "optim.lr",
    "optim.min_lr",
    "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.freeze_last_layer",
)


def _preset_recipe(name: str) -> dict:
    """The :data:`RECIPE_KEYS` of a preset (the config's defaults where the preset leaves one out)."""
    from ibot.config import build_config, flatten, to_dict

    flat = flatten(to_dict(build_config(name)))
    return {k: flat[k] for k in RECIPE_KEYS}


# (width, depth, heads, prototypes, head hidden, head bottleneck) by scale
MODELS = {
    "cpu-small": (128, 4, 4, 512, 512, 128),
    "cpu-large": (192, 6, 3, 1024, 1024, 256),
    "gpu-small": (192, 12, 3, 4096, 2048, 256),
    "gpu-large": (384, 12, 6, 8192, 2048, 256),
}
CPU_LARGE_FROM, GPU_LARGE_FROM = 20_000, 20_000  # training images from which the larger model is fitted


def _model_fits(n_train: int, machine: Machine) -> list[Fit]:
    dev = "cpu" if machine.device == "cpu" else "gpu"
    large = n_train >= (CPU_LARGE_FROM if dev == "cpu" else GPU_LARGE_FROM)
    name = f"{dev}-{'large' if large else 'small'}"
    width, depth, heads, k, hidden, bottleneck = MODELS[name]
    why = f"{n_train} training images on {'a GPU' if dev == 'gpu' else f'{machine.cores} CPU cores'} -> {name} ViT"
    k_why = f"{name}: {k} prototypes"
    if k <= 512:  # a small set leaves most of 512 prototypes unused: about one per 4 images, 128 at least
        k = max(128, min(k, 1 << max(0, (n_train // 4).bit_length() - 1)))
        k_why = f"about one prototype per 4 of {n_train} images (128 to 512)"
    fits = [
        Fit("model.embed_dim", width, why),
        Fit("model.depth", depth, why),
        Fit("model.num_heads", heads, why),
        Fit("model.out_dim", k, k_why),
        Fit("model.patch_out_dim", k, "shared head: as many patch prototypes"),
        Fit("model.hidden_dim", hidden, f"{name} head"),
        Fit("model.bottleneck_dim", bottleneck, f"{name} head"),
    ]
    preset = "vit_small_in1k" if dev == "gpu" and large else "fmnist_tiny"
    src = "the official ViT-S/16 recipe" if dev == "gpu" and large else "the fmnist_tiny recipe (benchmarks/README.md)"
    return [Fit(k, v, src) for k, v in _preset_recipe(preset).items()] + fits


def _resolution_fits(info: dict, machine: Machine, user: dict) -> list[Fit]:
    """Crop sizes, patch and channels; the local crops follow a size or patch the user set."""
    side = int(info.get("median_side") or 32)
    size = int(user.get("model.img_size", snap_size(side, machine.device)))
    patch = int(user.get("model.patch_size", patch_for(size)))
    grid = size // patch
    capped = f", capped at {MAX_SIZE[machine.device]} on the {machine.device.upper()}" if side > size else ""
    why = f"images {side} px median short side -> {size} px{capped}"
    local = max(patch * 3, (size // 2) // patch * patch)
    n_local = 4 if machine.device == "cpu" else 8
    return [
        Fit("model.img_size", size, why),
        Fit("model.patch_size", patch, f"{grid}x{grid} patch grid"),
        Fit("model.in_chans", info["channels"], "grayscale images" if info["channels"] == 1 else "colour images"),
        Fit("data.local_crops_number", n_local, f"multi-crop on the {machine.device.upper()}"),
        Fit("data.local_crop_size", local, f"half the global crop ({local // patch}x{local // patch} patches)"),
        Fit("data.blur_scale", round(size / 224, 2), f"blur radius scaled to {size} px (official radii are for 224)"),
    ]


MIN_HELD_OUT = 200  # held-out images below which a folder without val/ holds out more (up to 30%)


def _holdout_fits(info: dict, user: dict) -> tuple[list[Fit], int]:
    """(the hold-out fit, training images): a small labelled set holds out enough to make its score mean
    something (per class for a folder, a hashed share of the keys for shards and Hugging Face datasets);
    a Hugging Face DatasetDict's validation / test split evaluates instead when it has one."""
    n = info["n_images"]
    if info.get("val_split") and "data.val_path" not in user:
        name = info["val_split"]
        return [Fit("data.val_path", f"split:{name}", f"the dataset's {name!r} split evaluates")], n
    if not info.get("labelled", info["dataset"] == "imagefolder") or info["has_val"]:
        return [], n
    from ibot.data.datasets import default_holdout

    share = float(user.get("data.holdout", default_holdout(n, min_held=MIN_HELD_OUT)))
    held = round(share * n)
    se = 100 * math.sqrt(0.25 / max(held, 1))  # the binomial standard error at 50%, the worst case
    where = "no val/" if info["dataset"] == "imagefolder" else "no data.val_path"
    why = f"{n} images, {where}: {held} held out for evaluation (k-NN standard error up to {se:.1f} points)"
    return [Fit("data.holdout", round(share, 3), why)], n - held


def _schedule_fits(fl: dict, info: dict, n_train: int, machine: Machine, user: dict) -> list[Fit]:
    """Batch, epochs from the time budget, warm-ups, teacher momentum, workers."""
    dev = machine.device
    batch = 64 if dev == "cpu" else 128
    batch = min(batch, max(2, 1 << max(1, (n_train // (8 * machine.processes)).bit_length() - 1)))
    fl = {**fl, "optim.batch_size": batch, **user}
    ips = images_per_second(fl, info["channels"], machine)
    budget = float(user.get("run.time_limit_min") or BUDGET_MIN[dev])
    epochs = max(1, min(800, int(budget * 60 * ips / n_train)))
    why_epochs = (
        f"{budget:g} min budget at about {ips:.0f} images/s (estimated) over {n_train} images"
        f" (run.time_limit_min sets the budget, optim.epochs the length)"
    )
    epochs = int(user.get("optim.epochs", epochs))
    steps = epochs * max(1, n_train // (batch * machine.processes))
    warm = round(max(0.2, 0.1 * epochs), 1)
    total = batch * machine.processes
    base_lr = float(fl.get("optim.lr", 5e-4))
    lr = float(f"{base_lr * math.sqrt(256 / total):.2g}") if total < 256 else base_lr  # applied linearly
    fits = [
        Fit("optim.batch_size", batch, f"at least 8 steps per epoch over {n_train} images"),
        Fit("optim.lr", lr, f"{base_lr:g} at batch 256, square-root scaled to a total batch of {total}"),
        Fit("optim.epochs", epochs, why_epochs),
        Fit("optim.warmup_epochs", warm, f"10% of {epochs} epochs"),
        Fit("loss.warmup_teacher_temp_epochs", max(1, min(30, math.ceil(0.1 * epochs))), "10% of the epochs"),
        Fit("optim.momentum_teacher", 0.99 if steps < 5000 else 0.996, f"{steps} steps in all"),
        Fit("data.num_workers", max(1, min(8, machine.cores // machine.processes - 1)), f"{machine.cores} cores"),
    ]
    if "optim.epochs" not in user:  # the budget is kept even when the estimate is optimistic
        guard = round(1.3 * budget, 1)
        fits.append(Fit("run.time_limit_min", guard, f"the {budget:g} min budget + 30% if the estimate is off"))
    return fits


def fit_recipe(info: dict, machine: Machine, user: dict | None = None) -> list[Fit]:
    """Every key a folder run fits, with its value and why (the user's keys are applied on top by the caller).

    Args:
        info: :func:`ibot.data_setup.inspect_data` of ``data.path`` (a folder, shards, a Hugging Face dataset).
        machine: where the run trains.
        user: the user's flattened overrides (read for the budget, epochs and hold-out they set).
    """
    user = user or {}
    what = {"wds": "WebDataset shards", "hf": "a Hugging Face dataset"}.get(info["dataset"])
    what = what or ("class sub-folders" if info["classes"] else "no class sub-folders")
    fits = [Fit("data.dataset", info["dataset"], what)]
    fits.append(Fit("data.pipeline", "auto", "pil on the CPU, gpu on CUDA"))
    holdout, n_train = _holdout_fits(info, user)
    fits += holdout + _model_fits(n_train, machine) + _resolution_fits(info, machine, user)
    fl = {f.key: f.value for f in fits}
    fits += _schedule_fits(fl, info, n_train, machine, user)
    return list({f.key: f for f in fits}.values())  # a later fit of a key replaces the base recipe's


def format_fits(fits: list[Fit], user: dict) -> list[str]:
    """The block printed before training: the fitted keys grouped by reason (keys the user set are left out)."""
    groups: dict[str, list[str]] = {}
    for f in fits:
        if f.key not in user:
            value = f"[{','.join(f'{v:g}' for v in f.value)}]" if isinstance(f.value, list) else f.value
            groups.setdefault(f.why, []).append(f"{f.key}={value}")
    return [f"  {' '.join(keys)}  <- {why}" for why, keys in groups.items()]


def resolve_pretrain_config(preset: str | None, overrides: list[str], machine: Machine | None = None):
    """The config ``ibot pretrain`` trains (and ``ibot config`` prints), and the lines that explain it.

    ``data.path=DIR`` without a preset or ``data.dataset``: the recipe fitted to the folder and the
    machine (:func:`fit_recipe`), under the user's keys. Otherwise the preset (default ``fmnist_tiny``)
    with the folder's dataset, channels and batch (:func:`ibot.data_setup.folder_overrides`).

    Returns:
        ``(config, lines)``.
    """
    from ibot.config import build_config, flatten, parse_override, to_dict
    from ibot.data.datasets import DatasetError
    from ibot.data_setup import describe_folder, folder_overrides, inspect_data

    user = dict(parse_override(o) for o in overrides)
    info = inspect_data(user["data.path"], user) if user.get("data.path") and "data.dataset" not in user else None
    if preset is None and info is not None and info["n_images"] is None:
        raise DatasetError(
            f"data.path={user['data.path']} streams without a row count, so no recipe can be fitted to it; "
            "name a preset and set data.steps_per_epoch=N"
        )
    if preset is None and info is not None:
        machine = machine or Machine.detect(str(user.get("run.device", "auto")))
        fits = fit_recipe(info, machine, user)
        cfg = build_config(None, {**{f.key: f.value for f in fits}, **user})
        where = f"{machine.cores} CPU cores" if machine.device == "cpu" else f"{machine.processes} GPU process(es)"
        what = "folder" if info["dataset"] in ("imagefolder", "folder") else "data"
        head = (
            f"data.path={user['data.path']}: {describe_folder(info, cfg.data.holdout)}; recipe fitted to the {what} "
            f"and this machine ({where}); a preset or any key you set wins:"
        )
        return cfg, [head, *format_fits(fits, user)]
    base = flatten(to_dict(build_config(preset or "fmnist_tiny")))
    found, message = folder_overrides(base, user, info)
    return build_config(preset or "fmnist_tiny", {**found, **user}), [message] if message else []
