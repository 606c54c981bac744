"""Linear probe on frozen features: the official multi-lr sweep, with the lr picked on a validation split.

Features (computed once, cached): the concatenated final-norm class tokens of the last ``n_last_blocks``
blocks, optionally with the mean of the final patch tokens (official ``avgpool_patchtokens``).
Every learning rate of the sweep trains its own linear classifier in the same pass over the
cached features (SGD, momentum 0.9, cosine schedule, as the official ``eval_linear_multi``). The
learning rate is chosen on a validation split carved from the training set, and only then is the
test accuracy of that one classifier reported (the official code picks on the test set: we don't).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ibot.device import inference_autocast
from ibot.eval.knn import _file_batches, _tensor_batches, progress_images

DEFAULT_LRS = tuple(m * 10.0**k for k in range(-4, 1) for m in range(1, 10))  # official {1..9} x 10^k, k=-4..0


@torch.no_grad()
def extract_linear_features(
    backbone,
    dataset,
    *,
    image_size: int,
    n_last_blocks: int = 4,
    avgpool: bool = False,
    device="cpu",
    batch_size: int = 256,
    limit: int = 0,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "linear features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, n_last_blocks * D [+ D]) features and (N,) labels of the first ``limit`` images (0 = all)."""
    n = len(dataset) if not limit else min(limit, len(dataset))
    kept: list[int] | None = None  # file datasets: the labels of the readable images
    if hasattr(dataset, "images"):
        batches = _tensor_batches(dataset.images[:n], image_size, batch_size)
    else:
        kept = []
        sub = torch.utils.data.Subset(dataset, range(n))
        batches = _file_batches(sub, image_size, backbone.in_chans, batch_size, num_workers, kept)
    feats = []
    for x in progress_images(batches, n, desc, progress):
        with inference_autocast(device):  # bf16 on CUDA, fp32 on the CPU
            layers = backbone.get_intermediate_layers(x.to(device, non_blocking=True), n_last_blocks)
        f = torch.cat([t[:, 0] for t in layers], dim=-1)
        if avgpool:
            f = torch.cat([f, layers[-1][:, 1:].mean(1)], dim=-1)
        feats.append(f.float().cpu())
    labels = dataset.labels[:n] if kept is None else torch.tensor(kept, dtype=torch.long)
    return torch.cat(feats), labels.long()


def train_linear_sweep(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    lrs=DEFAULT_LRS,
    epochs: int = 30,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> tuple[float, torch.Tensor, torch.Tensor, dict]:
    """Train one linear classifier per lr on (train_x, train_y); pick the best by val top-1.

    ``lr`` is scaled by batch/256 as the official code. ``progress`` shows a bar over the epochs.
    Returns ``(best lr, W (F, C), b (C,), {lr: val top-1})``.
    """
    gen = torch.Generator().manual_seed(seed)
    n_lr, d = len(lrs), train_x.shape[1]
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)  # standardise once (not per classifier)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    w = (torch.randn(n_lr, d, num_classes, generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(n_lr, 1, num_classes, requires_grad=True)
    lr = torch.tensor(lrs, dtype=torch.float32).view(-1, 1, 1) * batch_size / 256
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = max(1, tx.shape[0] // batch_size)
    total = epochs * steps_per_epoch
    step = 0
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc=f"linear probe ({n_lr} lrs)", unit="epoch", dynamic_ncols=True)
    for _ in epoch_iter:
        order = torch.randperm(tx.shape[0], generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            logits = torch.einsum("bf,lfc->lbc", tx[idx], w) + b
            loss = F.cross_entropy(logits.reshape(-1, num_classes), train_y[idx].repeat(n_lr), reduction="sum")
            gw, gb = torch.autograd.grad(loss / idx.numel(), (w, b))
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                mw.mul_(0.9).add_(gw)
                mb.mul_(0.9).add_(gb)
                w.sub_(lr * scale * mw)
                b.sub_(lr * scale * mb)
            step += 1
    with torch.no_grad():
        acc = (torch.einsum("bf,lfc->lbc", vx, w) + b).argmax(-1).eq(val_y).float().mean(1) * 100
    best = int(acc.argmax())
    w_out = (w[best] / std.unsqueeze(1)).detach()
    b_out = (b[best, 0] - (mean / std) @ w[best]).detach()
    return float(lrs[best]), w_out, b_out, {float(lr_): float(a) for lr_, a in zip(lrs, acc, strict=True)}


def linear_accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) percent of the linear classifier ``x @ w + b``."""
    logits = x @ w + b
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return float((top[:, 0] == y).float().mean() * 100), float((top == y.unsqueeze(1)).any(1).float().mean() * 100)
