"""``ibot shards SRC --out DIR``: write WebDataset shards (and their ``index.json``) from an image folder
or a Hugging Face dataset on disk.

Each sample is ``KEY.EXT`` (the image file's bytes, or the dataset row's, not re-encoded) plus
``KEY.cls`` (its class index) when labelled; keys are ``000000123``-style sample numbers. The
samples are shuffled once (seeded), so each shard mixes the classes, and cut into shards of
``shard_size`` samples. The
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


def source_samples(src: str | Path) -> tuple[int, object, list[str]]:
    """``(n, read, classes)`` of a source: ``read(i)`` -> ``(encoded image bytes, ".ext", label)``.

    An ImageFolder (class sub-folders), a folder of unlabelled images (labels -1, no classes), or a
    Hugging Face dataset on disk (``save_to_disk`` or Parquet, :class:`ibot.data.hf.HFImageDataset`).
    """
    from ibot.data.hf import HFImageDataset, is_hf_path

    root = Path(src).expanduser()
    if not root.is_dir():
        raise DatasetError(f"shard source {str(src)!r} is not a folder; pass an ImageFolder or a folder of images")
    if is_hf_path(root):
        ds = HFImageDataset(root)

        def read_row(i: int) -> tuple[bytes, str, int]:
            data, name, label = ds.read_bytes(i)
            return data, name.rpartition("]")[2], label  # "" when the bytes are no known image format

        return len(ds), read_row, list(ds.classes)
    labelled = any(d.is_dir() for d in root.iterdir())
    samples = FileImageDataset(root, labelled=labelled)

    def read_file(i: int) -> tuple[bytes, str, int]:
        file, label = samples.samples[i]
        return Path(file).read_bytes(), Path(file).suffix.lower(), label

    return len(samples), read_file, list(samples.classes)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same source gives the same bytes
    tf.addfile(info, io.BytesIO(data))


def write_shards(
    src: str | Path, out: str | Path, shard_size: int = 5000, seed: int = 0, progress: bool = True, log=print
) -> dict:
    """Write ``out/shard-NNNNNN.tar`` of ``shard_size`` samples each and ``out/index.json``; returns the index.

    Args:
        src: an ImageFolder (``SRC/CLASS/*.jpg``), a folder of unlabelled images, or a Hugging Face
            dataset on disk (``save_to_disk`` or Parquet; its train split).
        out: the output folder (created; existing ``shard-*.tar`` there are an error).
        shard_size: samples per shard.
        seed: the one shuffle of the samples.
    """
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise DatasetError(f"--shard-size {shard_size} must be at least 1")
    n, read, classes = source_samples(src)
    out = Path(out).expanduser()
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise DatasetError(f"{out} already holds shards; pass an empty or new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    index = {"format": INDEX_FORMAT, "source": str(src), "classes": classes, "shards": {}}
    t0, n_bytes, skipped = time.time(), 0, []
    with tqdm(total=len(order), desc="writing shards", unit="img", disable=not progress) as bar:
        for s, start in enumerate(range(0, len(order), shard_size)):
            path = out / f"shard-{s:06d}.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
                for i in order[start : start + shard_size]:
                    data, ext, label = read(i)
                    bar.update(1)
                    if not ext:
                        skipped.append(i)
                        continue
                    n_bytes += len(data)
                    _add(tf, f"{i:09d}{ext}", data)
                    if label >= 0:
                        _add(tf, f"{i:09d}.cls", str(label).encode())
            index["shards"][path.name] = {"size": path.stat().st_size, "samples": scan_shard(path)["samples"]}
    (out / INDEX_FILE).write_text(json.dumps(index))
    n_shards = len(index["shards"])
    if skipped:
        log(f"skipped {len(skipped)} item(s) of {src} whose bytes are no known image format (first: item {skipped[0]})")
    log(
        f"wrote {len(order) - len(skipped)} images ({n_bytes / 1e6:.1f} MB) in {n_shards} shard(s) of up to "
        f"{shard_size} to {out} in {time.time() - t0:.1f}s; train with data.dataset=wds data.path={out}"
    )
    return index
