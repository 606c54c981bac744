"""``ibot shards SRC --out DIR``: write WebDataset shards (and their ``index.json``) from an image folder.

Each sample is ``KEY.EXT`` (the image file's bytes, not re-encoded) plus ``KEY.cls`` (its class index)
for an ImageFolder; keys are ``000000123``-style sample numbers. The samples are shuffled once
(seeded), so each shard mixes the classes, and cut into shards of ``shard_size`` samples. The
``index.json`` written next to them holds the class names and the byte range of every sample, so
:class:`ibot.data.shards.ShardDataset` opens the folder without scanning the tars.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import torch

from ibot.data.datasets import DatasetError, FileImageDataset
from ibot.data.shards import INDEX_FILE, INDEX_FORMAT, scan_shard


def source_samples(src: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``[(image file, label)]`` and the class names of an ImageFolder (class sub-folders) or a flat
    folder (labels -1, no classes)."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DatasetError(f"shard source {str(src)!r} is not a folder; pass an ImageFolder or a folder of images")
    labelled = any(d.is_dir() for d in root.iterdir())
    ds = FileImageDataset(root, labelled=labelled)
    return list(ds.samples), list(ds.classes)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same source gives the same bytes
    tf.addfile(info, io.BytesIO(data))


def write_shards(
    src: str | Path, out: str | Path, shard_size: int = 5000, seed: int = 0, progress: bool = True, log=print
) -> dict:
    """Write ``out/shard-NNNNNN.tar`` of ``shard_size`` samples each and ``out/index.json``; returns the index.

    Args:
        src: an ImageFolder (``SRC/CLASS/*.jpg``) or a folder of unlabelled images.
        out: the output folder (created; existing ``shard-*.tar`` there are an error).
        shard_size: samples per shard.
        seed: the one shuffle of the samples.
    """
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise DatasetError(f"--shard-size {shard_size} must be at least 1")
    samples, classes = source_samples(src)
    out = Path(out).expanduser()
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise DatasetError(f"{out} already holds shards; pass an empty or new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    index = {"format": INDEX_FORMAT, "source": str(src), "classes": classes, "shards": {}}
    t0, n_bytes = time.time(), 0
    with tqdm(total=len(order), desc="writing shards", unit="img", disable=not progress) as bar:
        for s, start in enumerate(range(0, len(order), shard_size)):
            path = out / f"shard-{s:06d}.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
                for i in order[start : start + shard_size]:
                    file, label = samples[i]
                    data = Path(file).read_bytes()
                    n_bytes += len(data)
                    _add(tf, f"{i:09d}{Path(file).suffix.lower()}", data)
                    if label >= 0:
                        _add(tf, f"{i:09d}.cls", str(label).encode())
                    bar.update(1)
            index["shards"][path.name] = {"size": path.stat().st_size, "samples": scan_shard(path)["samples"]}
    (out / INDEX_FILE).write_text(json.dumps(index))
    n_shards = len(index["shards"])
    log(
        f"wrote {len(order)} images ({n_bytes / 1e6:.1f} MB) in {n_shards} shard(s) of up to {shard_size} to {out} "
        f"in {time.time() - t0:.1f}s; train with data.dataset=wds data.path={out}"
    )
    return index
