"""Pictures of what a backbone learned: attention maps, prototype patterns, patch correspondences.

Every function takes a loaded backbone (see :func:`ibot.builders.sources.load_backbone`) and writes a PNG.
The backbone runs where its weights are (move it with ``.to(device)``; on CUDA under bf16 autocast);
images may live anywhere, and what comes back for plotting is on the CPU in fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ibot.device import inference_autocast


def _run(module, fn, *xs):
    """``fn(*xs)`` with the inputs on ``module``'s device (bf16 autocast on CUDA); fp32 CPU outputs."""
    dev = next(module.parameters(), torch.empty(0)).device  # a parameter-free module runs on the CPU
    with torch.no_grad(), inference_autocast(dev):
        out = fn(*(x.to(dev, non_blocking=True) for x in xs))
    if isinstance(out, tuple):
        return tuple(o.float().cpu() for o in out)
    return out.float().cpu()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(x: torch.Tensor, mean, std) -> np.ndarray:
    """(C, H, W) normalised -> (H, W, 3) float in [0, 1]."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    img = (x.cpu() * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        img = img.repeat(3, 1, 1)
    return img.permute(1, 2, 0).numpy()


def cls_attention(backbone, images: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Last-layer CLS-to-patch attention (B, heads, h, w), optionally masked to keep ``threshold`` of the mass.

    The map is computed explicitly for the last block only (the others keep fused SDPA).
    """
    b, _, hh, ww = images.shape
    gh, gw = backbone.grid_size(hh, ww)
    attn = _run(backbone, backbone.last_selfattention, images)[:, :, 0, 1:]  # (B, heads, N)
    if threshold is not None:
        vals, idx = attn.sort(dim=-1)
        vals = vals / vals.sum(dim=-1, keepdim=True)
        keep = vals.cumsum(dim=-1) > (1 - threshold)
        mask = torch.zeros_like(attn).scatter_(-1, idx, keep.float())
        attn = mask
    return attn.reshape(b, -1, gh, gw)


def plot_attention(backbone, images: torch.Tensor, out: str | Path, mean, std, threshold: float | None = None) -> Path:
    """PNG grid: per image a row of (image, each head's map overlaid, mean over heads)."""
    plt = _plt()
    attn = cls_attention(backbone, images, threshold)
    b, heads = attn.shape[:2]
    up = F.interpolate(attn.float(), size=images.shape[-2:], mode="nearest")
    fig, axes = plt.subplots(b, heads + 2, figsize=(1.8 * (heads + 2), 1.8 * b), squeeze=False)
    for i in range(b):
        img = _show(images[i], mean, std)
        maps = list(up[i]) + [up[i].mean(0)]
        axes[i, 0].imshow(img)
        for j, m in enumerate(maps):
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            axes[i, j + 1].imshow(img)
            axes[i, j + 1].imshow(m.numpy(), cmap="inferno", alpha=0.6)
            if i == 0:
                axes[i, j + 1].set_title("mean" if j == heads else f"head {j}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


@torch.no_grad()
def prototype_assignments(backbone, head, images: torch.Tensor, kind: str = "patch", batch_size: int = 128):
    """Per image: (max logit, argmax prototype) of every patch (B, N) or of the CLS token (B,)."""
    vals, idxs = [], []

    def assign(x):
        cls, patches = backbone(x)
        if kind == "cls":
            logits = head.last_layer(head.project(cls))
        else:
            b, n, d = patches.shape
            logits = head.patch_prototypes(head.project(patches.reshape(b * n, d))).reshape(b, n, -1)
        return logits.max(dim=-1)

    for i in range(0, images.shape[0], batch_size):
        v, j = _run(backbone, assign, images[i : i + batch_size])
        j = j.long()
        vals.append(v)
        idxs.append(j)
    return torch.cat(vals), torch.cat(idxs)


def plot_patterns(
    backbone,
    head,
    images: torch.Tensor,
    out_dir: str | Path,
    mean,
    std,
    *,
    topk: int = 16,
    show: int = 8,
    window: int = 3,
    kind: str = "patch",
) -> list[Path]:
    """For the ``show`` most populated prototypes, the top-k patches (with a ``window``-patch context).

    Writes one PNG per prototype (``pattern_XXXX.png``) and returns their paths.
    """
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vals, idxs = prototype_assignments(backbone, head, images, kind)
    p = backbone.mask_cell  # pixels per grid position (a Swin's final-stage cell)
    gh, gw = backbone.grid_size(*images.shape[-2:])
    flat_v, flat_i = vals.reshape(-1), idxs.reshape(-1)
    counts = torch.bincount(flat_i)
    paths = []
    for proto in counts.argsort(descending=True)[:show].tolist():
        where = (flat_i == proto).nonzero().squeeze(1)
        best = where[flat_v[where].argsort(descending=True)[:topk]]
        cols = min(len(best), 8)
        rows = math.ceil(len(best) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for k, t in enumerate(best.tolist()):
            ax = axes.flat[k]
            if kind == "cls":
                ax.imshow(_show(images[t], mean, std))
                continue
            img_i, tok = divmod(t, gh * gw)
            r, c = divmod(tok, gw)
            half = window // 2
            r0, r1 = max(0, r - half) * p, min(gh, r + half + 1) * p
            c0, c1 = max(0, c - half) * p, min(gw, c + half + 1) * p
            img = _show(images[img_i], mean, std)
            ax.imshow(img[r0:r1, c0:c1])
            ax.add_patch(plt.Rectangle((c * p - c0 - 0.5, r * p - r0 - 0.5), p, p, fill=False, ec="red", lw=1))
        fig.suptitle(f"prototype {proto} ({int(counts[proto])} {kind} tokens)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"pattern_{proto:05d}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


@torch.no_grad()
def match_patches(backbone, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch of image ``a`` (C, H, W): best-matching patch of ``b`` and its cosine similarity."""
    _, pa = _run(backbone, backbone, a.unsqueeze(0))
    _, pb = _run(backbone, backbone, b.unsqueeze(0))
    sim = F.normalize(pa[0], dim=-1) @ F.normalize(pb[0], dim=-1).t()
    s, j = sim.max(dim=1)
    return j, s


def crop_views(image: torch.Tensor, size: int, boxes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Square crops (top, left, side) of a (C, H, W) image, resized to ``size``."""
    out = []
    for top, left, side in boxes:
        crop = image[:, top : top + side, left : left + side].unsqueeze(0)
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    return out


def geometric_accuracy(match: torch.Tensor, grid: int, box_a, box_b, tolerance: float = 1.0) -> float:
    """Share of matches landing within ``tolerance`` patches of where the crop geometry says they should.

    Only patches of view A whose centre falls inside view B are counted.
    """
    (ta, la, sa), (tb, lb, sb) = box_a, box_b
    hits, total = 0, 0
    for t in range(grid * grid):
        r, c = divmod(t, grid)
        y = ta + (r + 0.5) * sa / grid  # patch centre in original-image pixels
        x = la + (c + 0.5) * sa / grid
        rb, cb = (y - tb) / sb * grid - 0.5, (x - lb) / sb * grid - 0.5  # expected position in B (patch units)
        if not (-0.5 <= rb <= grid - 0.5 and -0.5 <= cb <= grid - 0.5):
            continue
        mr, mc = divmod(int(match[t]), grid)
        total += 1
        hits += int(abs(mr - rb) <= tolerance and abs(mc - cb) <= tolerance)
    return hits / max(total, 1)


def two_view_boxes(size: int, share: float = 0.75) -> list[tuple[int, int, int]]:
    """Two square crops (top, left, side) of a ``size`` image: top-left and bottom-right, ``share`` wide."""
    side = int(size * share)
    return [(0, 0, side), (size - side, size - side, side)]


@torch.no_grad()
def correspondence_accuracy(backbone, images: torch.Tensor, tolerance: float = 0.5, share: float = 0.75) -> dict:
    """Mean geometric accuracy of patch matches between two overlapping views of each image.

    Each (C, S, S) image gives two crops (:func:`two_view_boxes`) resized back to S; every patch of
    view A that lies inside view B is matched to its most similar patch of B, and counts as right
    when it lands within ``tolerance`` patches of where the crop geometry puts it. Also returns the
    same score for uniformly random matches (chance), averaged over the same images.
    """
    size = images.shape[-1]
    boxes = two_view_boxes(size, share)
    grid = backbone.grid_size(size, size)[0]
    gen = torch.Generator().manual_seed(0)
    model, chance = [], []
    for x in images:
        a, b = crop_views(x, size, boxes)
        match, _ = match_patches(backbone, a, b)
        model.append(geometric_accuracy(match, grid, boxes[0], boxes[1], tolerance))
        rand = torch.randint(0, grid * grid, (grid * grid,), generator=gen)
        chance.append(geometric_accuracy(rand, grid, boxes[0], boxes[1], tolerance))
    return {"accuracy": sum(model) / len(model), "chance": sum(chance) / len(chance), "n": len(model)}


def plot_correspondence(
    a: torch.Tensor,
    b: torch.Tensor,
    match: torch.Tensor,
    sim: torch.Tensor,
    patch: int,
    out: str | Path,
    mean,
    std,
    top: int = 30,
    title: str = "",
) -> Path:
    """Two images side by side with lines between the ``top`` most similar patch matches."""
    plt = _plt()
    ia, ib = _show(a, mean, std), _show(b, mean, std)
    h, w = ia.shape[:2]
    grid_w = w // patch
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.imshow(np.concatenate([ia, ib], axis=1))
    order = sim.argsort(descending=True)[:top]
    colors = plt.cm.hsv(np.linspace(0, 1, len(order), endpoint=False))
    for col, t in zip(colors, order.tolist(), strict=True):
        ra, ca = divmod(t, grid_w)
        rb, cb = divmod(int(match[t]), grid_w)
        ax.plot(
            [(ca + 0.5) * patch, w + (cb + 0.5) * patch], [(ra + 0.5) * patch, (rb + 0.5) * patch], color=col, lw=0.8
        )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def correspond(backbone, images: torch.Tensor, out: str | Path, mean, std, *, pair: bool = False) -> dict:
    """Patch correspondences drawn to ``out`` (what ``ibot viz correspond`` shows).

    ``pair``: between ``images[0]`` and ``images[1]``. Otherwise between two overlapping views of
    ``images[0]`` (:func:`two_view_boxes`), scored against the crop geometry, and over all ``images``
    by :func:`correspondence_accuracy`. Returns ``{"path", "accuracy", "score"}`` (the drawn image's
    share of right matches and the all-images score; None for a pair).
    """
    if pair:
        a, b = images[0], images[1]
        title, acc, score = "two images", None, None
    else:
        size = images.shape[-1]
        boxes = two_view_boxes(size)
        a, b = crop_views(images[0], size, boxes)
        title = "two views of one image"
    match, sim = match_patches(backbone, a, b)
    if not pair:
        acc = geometric_accuracy(match, backbone.grid_size(size, size)[0], boxes[0], boxes[1])
        title += f": {100 * acc:.1f}% of matches where the crop geometry says"
        score = correspondence_accuracy(backbone, images)
    path = plot_correspondence(a, b, match, sim, backbone.mask_cell, out, mean, std, title=title)
    return {"path": path, "accuracy": acc, "score": score}


def load_images(
    info: dict,
    *,
    files: list[str] | None = None,
    dataset: str | None = None,
    data_path=None,
    n: int = 4,
    size: int | None = None,
) -> torch.Tensor:
    """(n, C, S, S) normalised images from files or from the first test images of a dataset."""
    from ibot.data.datasets import DatasetError, build_dataset, load_image
    from ibot.data.transforms import eval_transform
    from ibot.eval.knn import _tensor_batches

    size = size or info["img_size"]
    if files:
        tf = eval_transform(size, info["in_chans"], info["mean"], info["std"], resize=size)
        images = []
        for f in files:
            if not Path(f).is_file():
                raise DatasetError(f"--images: {f} is not a file")
            try:
                images.append(tf(load_image(f)))
            except Exception as err:  # noqa: BLE001 - any decoder error: name the file
                raise DatasetError(f"--images: cannot read {f} as an image ({type(err).__name__}: {err})") from err
        return torch.stack(images)
    cfg = info.get("config")
    name = dataset or (cfg["data"]["dataset"] if cfg else None)
    if not name:
        raise DatasetError("give image files (--images) or a dataset (--dataset)")
    kw = {"image_size": info["img_size"], "in_chans": info["in_chans"]}
    if cfg:
        kw.update(synthetic_size=cfg["data"]["synthetic_size"], seed=cfg["run"]["seed"])
    ds = build_dataset(name, data_path or (cfg["data"]["path"] if cfg else None), train=False, **kw)
    if hasattr(ds, "images"):
        return next(_tensor_batches(ds.images[:n], size, n))
    tf = eval_transform(size, info["in_chans"], info["mean"], info["std"], resize=size)
    return torch.stack([tf(ds[i][0]) for i in range(min(n, len(ds)))])
