"""Classification fine-tuning of a pretrained backbone (the official BEiT-style protocol, with timm).

Layer-wise lr decay (``layer_decay ** (depth + 1 - layer_id)``; patch embedding, class token and
position embedding are layer 0), drop-path, label smoothing and mixup / cutmix from timm, AdamW
with a cosine schedule and linear warm-up. Presets carry the official per-size defaults; the batch,
epochs, warm-up, lr and mixup / cutmix / smoothing are then fitted to the number of training images
(:func:`fit_recipe`: the official values at ImageNet scale, enough steps and no mixup on a small folder).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ibot.data.transforms import AugmentSpec, BatchMultiCrop
from ibot.device import inference_autocast
from ibot.eval.knn import _tensor_batches

# official evaluation/README.md per-model settings (epochs, drop_path, layer_decay); lr 4e-3, wd 0.05,
# mixup 0.8, cutmix 1.0, label smoothing 0.1, warm-up 20 epochs (5 for ViT-L). fit_recipe keeps them at
# ImageNet scale; the epochs are a minimum there.
FINETUNE_PRESETS = {
    "vit_small": {"epochs": 200, "drop_path": 0.1, "layer_decay": 0.75, "warmup_epochs": 20},
    "vit_base": {"epochs": 100, "drop_path": 0.2, "layer_decay": 0.65, "warmup_epochs": 20},
    "vit_large": {"epochs": 50, "drop_path": 0.4, "layer_decay": 0.75, "warmup_epochs": 5},
    "tiny_cpu": {"epochs": 3, "drop_path": 0.1, "layer_decay": 0.75, "warmup_epochs": 1},
}
COMMON = {
    "lr": 4e-3,
    "weight_decay": 0.05,
    "mixup": 0.8,
    "cutmix": 1.0,
    "smoothing": 0.1,
    "batch_size": 128,
    "min_lr": 1e-6,
}


def layer_id(name: str, depth: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no decay on 1-D / bias."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_wd = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - lid),
            }
        groups[key]["params"].append(p)
    return list(groups.values())


# Size rules (issue 24). The official recipe (mixup 0.8, cutmix 1.0, smoothing 0.1, batch 128 x 8 GPUs)
# is tuned for 1.28M ImageNet images and 100-200 epochs (>100k steps, in which the model fits the data
# anyway; mixup and cutmix slow that fitting down to regularise it). Run unchanged on a 540-image folder
# (tiny_cpu: 3 epochs x 4 steps of batch 128) it stayed at chance, loss ln 2, also with 12 epochs
# (benchmarks/results/finetune_small_folder.txt). What took it off chance there is the schedule below
# (50% -> 88.2% on 1000 val images, linear probe 79.9%); with that schedule, mixup 0.8 / cutmix 1.0 made no
# difference beyond noise (86.8%). So the regularisers follow the size with the schedule's length in mind:
# - below SMALL_SET images: mixup and cutmix off: a few hundred steps leave no room to fit mixed targets
#   (two classes: half the pairs mix the two labels), and nothing measured here asks for them;
# - up to IMAGENET_SCALE images (Fashion-MNIST, CIFAR: 50-60k): light mixup 0.2 (the mixup paper's value
#   for ~100-epoch ImageNet schedules), cutmix off (on 28-56 px images a cut box removes most of the
#   object); a judgement, not measured here;
# - from IMAGENET_SCALE on: the official 0.8 / 1.0;
# - label smoothing 0.1 at every size: it softens the targets but keeps each image pulling towards its own
#   class, so it does not slow fitting (the fitted runs above learn with it).
SMALL_SET = 5_000
IMAGENET_SCALE = 500_000
# The schedule: at least MIN_STEPS optimiser steps (tiny_cpu on 540 images had 12: 3 epochs x 4 steps), a
# batch of at most 1/16 of the set (>= 16 steps per epoch; never under 16 images), the base lr scaled
# linearly with the batch (the preset's lr is for its batch_size), warm-up at most a fifth of the epochs
# (the official ViT-B ratio, 20 of 100).
MIN_STEPS = 300
MIN_BATCH = 16


def regularisers_for(n_train: int) -> dict:
    """mixup / cutmix alphas and label smoothing for ``n_train`` training images (the size rules above)."""
    if n_train < SMALL_SET:
        return {"mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1}
    if n_train < IMAGENET_SCALE:
        return {"mixup": 0.2, "cutmix": 0.0, "smoothing": 0.1}
    return {"mixup": COMMON["mixup"], "cutmix": COMMON["cutmix"], "smoothing": COMMON["smoothing"]}


def fit_recipe(n_train: int, preset: str = "tiny_cpu", **overrides) -> tuple[dict, str]:
    """The hyperparameters for ``n_train`` training images (preset, then the size rules, then the
    non-None ``overrides``), and one line saying what was chosen and why."""
    if n_train < 1:
        raise ValueError("fine-tuning needs at least one training image")
    given = {k: v for k, v in overrides.items() if v is not None}
    hp = {**COMMON, **FINETUNE_PRESETS[preset], **regularisers_for(n_train)}
    base_batch, base_lr = hp["batch_size"], hp["lr"]
    b = given.get("batch_size") or min(base_batch, max(MIN_BATCH, 2 ** int(math.log2(max(n_train / 16, 1)))))
    steps_per_epoch = max(1, n_train // b)
    epochs = given.get("epochs") or max(hp["epochs"], math.ceil(MIN_STEPS / steps_per_epoch))
    lr = given["lr"] if "lr" in given else base_lr * b / base_batch
    warmup = min(hp["warmup_epochs"], epochs / 5)
    hp.update(given, batch_size=b, epochs=epochs, lr=lr, warmup_epochs=warmup, steps_per_epoch=steps_per_epoch)
    preset_epochs = FINETUNE_PRESETS[preset]["epochs"]
    why = [
        f"batch {b}" + ("" if "batch_size" in given else f" (~1/16 of {n_train} images, {MIN_BATCH} to {base_batch})"),
        f"{epochs} epochs x {steps_per_epoch} steps"
        + ("" if "epochs" in given else f" (>= {MIN_STEPS} steps)" if epochs > preset_epochs else " (the preset's)"),
        f"warm-up {round(warmup * steps_per_epoch)} steps",
        f"lr {lr:g}" + ("" if "lr" in given else f" ({base_lr:g} x {b}/{base_batch})"),
    ]
    return hp, f"{', '.join(why)}; {describe_regularisers(hp, n_train)}"


def describe_regularisers(hp: dict, n_train: int) -> str:
    """e.g. ``mixup off, cutmix off, smoothing 0.1: 540 training images``."""
    parts = [f"{k} {hp[k]:g}" if hp[k] > 0 else f"{k} off" for k in ("mixup", "cutmix", "smoothing")]
    return f"{', '.join(parts)}: {n_train} training images"


def finetune(
    backbone,
    train_set,
    test_set,
    *,
    num_classes: int,
    image_size: int,
    preset: str = "tiny_cpu",
    device="cpu",
    log=print,
    **overrides,
) -> dict:
    """Fine-tune a copy of ``backbone`` (a MaskedViT) with a linear head; return test top-1.

    The hyperparameters are :func:`fit_recipe`'s for ``len(train_set)`` images (``overrides``, e.g.
    ``epochs=3, mixup=0.8``, win); ``log`` gets the line saying what was chosen and why.
    """
    if not hasattr(backbone, "vit"):
        raise ValueError(
            f"fine-tuning supports ViT backbones, not {type(backbone).__name__}; export the backbone "
            "(ibot export) and fine-tune it with timm's train.py"
        )
    hp, why = fit_recipe(len(train_set), preset, **overrides)
    log(f"finetune: {why}")
    vit = _classifier(backbone, num_classes, hp["drop_path"], device)
    t0 = time.time()
    _train(vit, train_set, hp, num_classes=num_classes, image_size=image_size, device=device, log=log)
    return {
        "test_top1": _top1(vit, test_set, image_size, device),
        "split": getattr(test_set, "split", f"{len(test_set)} test images"),
        "recipe": describe_regularisers(hp, len(train_set)),
        "why": why,
        "epochs": hp["epochs"],
        "preset": preset,
        "minutes": (time.time() - t0) / 60,
        "hyperparameters": hp,
    }


def _classifier(backbone, num_classes: int, drop_path: float, device) -> torch.nn.Module:
    """A trainable copy of the backbone's ViT with stochastic depth up to ``drop_path`` and a new head."""
    import copy

    from timm.layers import DropPath

    vit = copy.deepcopy(backbone.vit)
    for p in vit.parameters():
        p.requires_grad_(True)  # a teacher backbone comes frozen
    dpr = torch.linspace(0, drop_path, len(vit.blocks)).tolist()
    for blk, r in zip(vit.blocks, dpr, strict=True):
        blk.drop_path1 = DropPath(r) if r > 0 else torch.nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else torch.nn.Identity()
    vit.reset_classifier(num_classes)
    return vit.to(device)


def lr_at(step: int, hp: dict) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr`` at the last step."""
    total = hp["epochs"] * hp["steps_per_epoch"]
    warm = round(hp["warmup_epochs"] * hp["steps_per_epoch"])
    if step < warm:
        return hp["lr"] * step / warm
    return hp["min_lr"] + 0.5 * (hp["lr"] - hp["min_lr"]) * (
        1 + math.cos(math.pi * (step - warm) / max(total - warm, 1))
    )


def _train(vit, train_set, hp: dict, *, num_classes: int, image_size: int, device, log) -> None:
    """AdamW with layer decay, one random resized crop + flip per image, mixup / cutmix / smoothing (timm)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    opt = torch.optim.AdamW(layer_decay_groups(vit, hp["weight_decay"], hp["layer_decay"]), lr=hp["lr"])
    mixup = None
    if hp["mixup"] > 0 or hp["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=hp["mixup"], cutmix_alpha=hp["cutmix"], label_smoothing=hp["smoothing"], num_classes=num_classes
        )
    criterion = SoftTargetCrossEntropy()
    # no jitter, blur or solarization
    spec = AugmentSpec(
        global_crops_number=1,
        global_crop_size=image_size,
        global_crops_scale=(0.25, 1.0),
        local_crops_number=0,
        in_chans=train_set.images.shape[1],
        color_jitter_p=0.0,
        blur_p=(0.0, 0.0, 0.0),
        solarization_p=0.0,
    )
    aug = BatchMultiCrop(spec)
    b, n = hp["batch_size"], len(train_set)
    gen = torch.Generator().manual_seed(0)
    step = 0
    for epoch in range(hp["epochs"]):
        vit.train()
        order = torch.randperm(n, generator=gen)
        for i in range(hp["steps_per_epoch"]):
            idx = order[i * b : (i + 1) * b]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, hp) * g["lr_scale"]
            x, _ = aug(train_set.images[idx], gen)
            y = train_set.labels[idx]
            if mixup is not None and len(idx) % 2 == 0:
                x, y_soft = mixup(x, y)
            else:
                y_soft = F.one_hot(y, num_classes).float() * (1 - hp["smoothing"]) + hp["smoothing"] / num_classes
            with inference_autocast(device):  # bf16 autocast on CUDA (fp32 master weights), fp32 on the CPU
                logits = vit(x.to(device, non_blocking=True))
            loss = criterion(logits.float(), y_soft.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % max(1, hp["epochs"] // 10) == 0 or epoch + 1 == hp["epochs"]:  # ~10 lines
            log(f"finetune epoch {epoch + 1}/{hp['epochs']}: loss {loss.item():.4f}")


def _top1(vit, test_set, image_size: int, device) -> float:
    vit.eval()
    correct = 0
    with torch.no_grad():
        for i, x in enumerate(_tensor_batches(test_set.images, image_size, 256)):
            with inference_autocast(device):
                pred = vit(x.to(device, non_blocking=True)).argmax(-1).cpu()
            correct += int((pred == test_set.labels[i * 256 : i * 256 + len(x)]).sum())
    return 100.0 * correct / len(test_set)
