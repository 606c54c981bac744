"""k-NN evaluation (DINO / iBOT protocol) on L2-normalised frozen features.

Cosine similarity to a memory bank, top-k neighbours, votes weighted by ``exp(sim / T)``
(T = 0.07), top-1 and top-5 for several k. The test set is processed in chunks sized to bound
memory (no fixed number of chunks, so any test-set size works).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ibot import distributed as D
from ibot.data.datasets import DatasetError, slice_dataset
from ibot.data.transforms import eval_transform, norm_stats
from ibot.device import inference_autocast


def _tensor_batches(images: torch.Tensor, size: int, batch_size: int):
    in_chans = images.shape[1]
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in norm_stats(in_chans))
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].float() / 255.0
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        yield (x - mean) / std


class _Indexed(torch.utils.data.Dataset):
    """``dataset[i]`` as ``(i, item)``: the position travels with the item through the loader."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


def _file_batches(dataset, size: int, in_chans: int, batch_size: int, num_workers: int, labels: list, positions=None):
    """Normalised image batches; appends the label of every readable image to ``labels`` and, when
    given, its position in ``dataset`` to ``positions`` (unreadable ones, already reported with their
    path by the dataset, are left out)."""
    tf = eval_transform(size, in_chans)

    def collate(items):
        items = [(i, it) for i, it in items if it is not None]
        if not items:
            return None, []
        return torch.stack([tf(img) for _, (img, _) in items]), [(i, int(y)) for i, (_, y) in items]

    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=collate
    )
    for x, pos_y in loader:
        if x is not None:
            labels.extend(y for _, y in pos_y)
            if positions is not None:
                positions.extend(i for i, _ in pos_y)
            yield x


def progress_images(batches, total: int, desc: str, enabled: bool = True):
    """Yield ``batches`` of images, with a progress bar (images/s, ETA) on stderr when ``enabled``."""
    if not enabled:
        yield from batches
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for x in batches:
            yield x
            bar.update(x.shape[0])


@torch.no_grad()
def extract_features(
    encode,
    dataset,
    *,
    image_size: int,
    in_chans: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    limit: int = 0,
    progress: bool = False,
    desc: str = "features",
    amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) of ``encode(images)`` over a dataset, and its labels (N,).

    ``dataset`` is an in-memory :class:`~ibot.data.datasets.TensorImageDataset` (fast path) or
    any ``(PIL image, label)`` dataset; unreadable files (items ``None``) are left out, so N counts
    the readable images. ``limit`` keeps the first N images; ``progress`` shows a bar named ``desc``.
    ``amp``: on CUDA the batches are encoded under bf16 autocast (:func:`ibot.device.inference_autocast`);
    False: under the caller's context only (a training run's precision, fp32 included). Features are fp32.
    """
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, limit=limit, progress=progress)
    kw.update(desc=desc, amp=amp)
    feats, labels, _ = _extract(encode, dataset, image_size, in_chans, **kw)
    return feats, labels


def _extract(
    encode,
    dataset,
    image_size,
    in_chans,
    device="cpu",
    batch_size=256,
    num_workers=0,
    limit=0,
    progress=False,
    desc="",
    amp=True,
):
    """:func:`extract_features` and the dataset position (N,) of each row (readable images only)."""
    n = len(dataset) if not limit else min(limit, len(dataset))
    if hasattr(dataset, "images"):
        batches = _tensor_batches(dataset.images[:n], image_size, batch_size)
        labels, positions = dataset.labels[:n], torch.arange(n)
    else:
        sub = torch.utils.data.Subset(dataset, range(n))
        kept: list[int] = []
        positions = []
        batches = _file_batches(sub, image_size, in_chans, batch_size, num_workers, kept, positions)
        labels = None
    feats = []
    for x in progress_images(batches, n, desc, progress):
        with inference_autocast(device) if amp else nullcontext():
            f = encode(x.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=-1).cpu())
    if labels is None:  # file datasets: the readable images
        if not feats:
            raise DatasetError(f"none of the {n} evaluation images could be read (see the warnings for their paths)")
        positions, labels = torch.tensor(positions, dtype=torch.long), torch.tensor(kept, dtype=torch.long)
    return torch.cat(feats), labels.long(), positions


def extract_features_distributed(encode, dataset, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` with each rank encoding one contiguous shard, gathered on every rank
    (one process: :func:`extract_features` itself); ``kw`` as there.

    Every rank encodes the same number of images (the last shard overlaps the one before it), so
    ranks run the same number of forward passes, which FSDP2's collective all-gathers need. The
    gathered features keep each image once, in dataset order: rows are told apart by their image's
    position in the dataset, so an unreadable image in the overlap cannot shift which rows are kept.
    """
    if not D.is_dist():
        return extract_features(encode, dataset, **kw)
    import torch.distributed as dist

    n, w, r = len(dataset), D.world_size(), D.rank()
    per = -(-n // w)
    start = min(r * per, max(n - per, 0))
    f, y, pos = _extract(encode, slice_dataset(dataset, start, start + per), **kw)
    parts = [None] * w
    dist.all_gather_object(parts, (f, y, pos + start))
    feats, labels, covered = [], [], 0
    for f, y, pos in parts:  # shards in rank order: keep the images past the ones already kept
        keep = pos >= covered
        feats.append(f[keep])
        labels.append(y[keep])
        covered = max(covered, int(pos.max()) + 1) if len(pos) else covered
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_neighbours(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    kmax: int,
    device: torch.device | str | None = None,
    max_chunk_elements: int = 2**25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kmax`` most similar bank rows of every query: similarities (M, k) and their labels (M, k),
    most similar first; ``k = min(kmax, N)``. Computed in query chunks of at most ``max_chunk_elements``
    similarities, on ``device`` (default: the bank's)."""
    n = train_features.shape[0]
    dev = torch.device(device) if device is not None else train_features.device
    bank, bank_y = train_features.to(dev), train_labels.to(dev)
    chunk = max(1, max_chunk_elements // max(n, 1))
    sims, labels = [], []
    for i in range(0, test_features.shape[0], chunk):
        q = test_features[i : i + chunk].to(dev, non_blocking=True)
        sim, idx = (q @ bank.t()).topk(min(kmax, n), dim=1)
        sims.append(sim)
        labels.append(bank_y[idx])
    return torch.cat(sims), torch.cat(labels)


def merge_neighbours(parts: list[tuple[torch.Tensor, torch.Tensor]], kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kmax`` nearest of the union of several banks' neighbours (:func:`knn_neighbours` of each shard):
    (M, sum k_i) candidates -> (M, min(kmax, sum k_i)), most similar first."""
    sim = torch.cat([s for s, _ in parts], dim=1)
    lab = torch.cat([y for _, y in parts], dim=1)
    top, order = sim.topk(min(kmax, sim.shape[1]), dim=1)
    return top, lab.gather(1, order)


def knn_votes(
    sim: torch.Tensor,
    neighbour_labels: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
) -> dict[int, tuple[float, float]]:
    """Weighted votes (``exp(sim / T)``) of the first k neighbours for each k -> ``{k: (top1, top5)}`` percent.

    Args:
        sim: (M, K) similarities of each query's neighbours, most similar first (K >= max(ks)).
        neighbour_labels: (M, K) their labels.
        test_labels: (M,) the queries' labels.
    """
    y = test_labels.to(sim.device)
    weight = (sim / temperature).exp()
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=sim.device)  # summed on the device, read once
    for j, k in enumerate(ks):
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
        top = votes.topk(min(5, num_classes), dim=1).indices
        correct[j, 0] += (top[:, 0] == y).sum()
        correct[j, 1] += (top == y.unsqueeze(1)).any(1).sum()
    m = max(sim.shape[0], 1)
    counts = correct.tolist()
    return {k: (100.0 * counts[j][0] / m, 100.0 * counts[j][1] / m) for j, k in enumerate(ks)}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    max_chunk_elements: int = 2**25,
    device: torch.device | str | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[int, tuple[float, float]] | None:
    """Weighted k-NN accuracy (percent) for each k: ``{k: (top1, top5)}``.

    Args:
        train_features: (N, D) L2-normalised memory bank.
        train_labels: (N,) int labels.
        test_features: (M, D) L2-normalised queries.
        test_labels: (M,).
        ks: neighbour counts (each capped at N).
        temperature: vote weight ``exp(sim / T)``.
        num_classes: default max label + 1.
        max_chunk_elements: bound on the (chunk, N) similarity matrix.
        device: where the similarities and votes are computed (default: the features' device).
        shard: ``(rank, world size)`` under torchrun: this rank searches its contiguous share of the bank
            only, the ranks' top-k are all-gathered and merged (:func:`merge_neighbours`), and the main rank
            returns the accuracies (None on the others).
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty memory bank and test set")
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    n = train_features.shape[0]
    ks = sorted({min(int(k), n) for k in ks})
    if shard is None:
        sim, lab = knn_neighbours(train_features, train_labels, test_features, ks[-1], device, max_chunk_elements)
        return knn_votes(sim, lab, test_labels, ks, temperature, c)
    rank, world = shard
    per = -(-n // world)
    part = slice(min(rank * per, n), min((rank + 1) * per, n))
    sim, lab = knn_neighbours(train_features[part], train_labels[part], test_features, ks[-1], device)
    sim, lab = _gather_neighbours(sim, lab, ks[-1], world)
    return knn_votes(sim, lab, test_labels, ks, temperature, c) if rank == 0 else None


def _gather_neighbours(sim: torch.Tensor, lab: torch.Tensor, kmax: int, world: int):
    """Every rank's (M, <= kmax) neighbours, padded to kmax (similarity -inf), all-gathered and merged."""
    import torch.distributed as dist

    pad = kmax - sim.shape[1]
    sim = F.pad(sim, (0, pad), value=float("-inf")).contiguous()
    lab = F.pad(lab, (0, pad), value=0).contiguous()
    sims, labs = [torch.empty_like(sim) for _ in range(world)], [torch.empty_like(lab) for _ in range(world)]
    dist.all_gather(sims, sim)
    dist.all_gather(labs, lab)
    return merge_neighbours(list(zip(sims, labs, strict=True)), kmax)
