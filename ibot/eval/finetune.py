"""Classification fine-tuning of a pretrained backbone (the official BEiT-style protocol, with timm).

Layer-wise lr decay (``layer_decay ** (depth + 1 - layer_id)``; patch embedding, class token and
position embedding are layer 0), drop-path, label smoothing and mixup / cutmix from timm, AdamW
with a cosine schedule and linear warm-up. Presets carry the official per-size defaults.
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
# mixup 0.8, cutmix 1.0, label smoothing 0.1, warm-up 20 epochs (5 for ViT-L)
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
    """Fine-tune a copy of ``backbone`` (a MaskedViT) with a linear head; return test top-1."""
    import copy

    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    if not hasattr(backbone, "vit"):
        raise ValueError(
            f"fine-tuning supports ViT backbones, not {type(backbone).__name__}; export the backbone "
            "(ibot export) and fine-tune it with timm's train.py"
        )
    hp = {**COMMON, **FINETUNE_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    vit = copy.deepcopy(backbone.vit)
    for p in vit.parameters():
        p.requires_grad_(True)  # a teacher backbone comes frozen
    dpr = torch.linspace(0, hp["drop_path"], len(vit.blocks)).tolist()
    from timm.layers import DropPath

    for blk, r in zip(vit.blocks, dpr, strict=True):
        blk.drop_path1 = DropPath(r) if r > 0 else torch.nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else torch.nn.Identity()
    vit.reset_classifier(num_classes)
    vit = vit.to(device)
    opt = torch.optim.AdamW(layer_decay_groups(vit, hp["weight_decay"], hp["layer_decay"]), lr=hp["lr"])
    mixup = (
        Mixup(
            mixup_alpha=hp["mixup"], cutmix_alpha=hp["cutmix"], label_smoothing=hp["smoothing"], num_classes=num_classes
        )
        if hp["mixup"] > 0 or hp["cutmix"] > 0
        else None
    )
    criterion = SoftTargetCrossEntropy()
    in_chans = backbone.in_chans
    # one random resized crop + flip per image: no jitter, blur or solarization
    spec = AugmentSpec(
        global_crops_number=1,
        global_crop_size=image_size,
        global_crops_scale=(0.25, 1.0),
        local_crops_number=0,
        in_chans=in_chans,
        color_jitter_p=0.0,
        blur_p=(0.0, 0.0, 0.0),
        solarization_p=0.0,
    )
    aug = BatchMultiCrop(spec)
    b = hp["batch_size"]
    n = len(train_set)
    steps_per_epoch = max(1, n // b)
    total, warm = hp["epochs"] * steps_per_epoch, hp["warmup_epochs"] * steps_per_epoch
    gen = torch.Generator().manual_seed(0)
    step, t0 = 0, time.time()
    for epoch in range(hp["epochs"]):
        vit.train()
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * b : (i + 1) * b]
            lr = (
                hp["lr"] * step / max(warm, 1)
                if step < warm
                else hp["min_lr"]
                + 0.5 * (hp["lr"] - hp["min_lr"]) * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
            )
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
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
        log(f"finetune epoch {epoch + 1}/{hp['epochs']}: loss {loss.item():.4f}")
    vit.eval()
    correct = 0
    with torch.no_grad():
        for i, x in enumerate(_tensor_batches(test_set.images, image_size, 256)):
            with inference_autocast(device):
                pred = vit(x.to(device, non_blocking=True)).argmax(-1).cpu()
            correct += int((pred == test_set.labels[i * 256 : i * 256 + len(x)]).sum())
    return {
        "test_top1": 100.0 * correct / len(test_set),
        "epochs": hp["epochs"],
        "preset": preset,
        "minutes": (time.time() - t0) / 60,
        "hyperparameters": hp,
    }
