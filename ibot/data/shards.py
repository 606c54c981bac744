"""WebDataset shards as a map-style dataset: an index of ``(shard, byte offset, size)`` per sample.

``data.dataset=wds`` reads the tar shards WebDataset writes (and ``ibot shards`` writes) without
the ``webdataset`` library: each shard is scanned once with :mod:`tarfile` (or its entry in the
folder's ``index.json``), the image member of every sample is recorded by its byte range, and
``dataset[i]`` reads those bytes with one ``os.pread``. Sample ``i`` is a fixed place in the shards,
so :class:`ibot.data.loader.EpochSampler` orders, splits (ranks, workers) and resumes them exactly as
it does image folders.

WebDataset's tar conventions: the members of a sample are consecutive and share a key, the member's
path up to the first dot of its basename (``a/b/0001.seg.png`` -> key ``a/b/0001``, extension
``seg.png``). A sample's image is its first ``jpg``/``jpeg``/``png``/``webp`` (or other image)
member; its label the integer in a ``cls`` member or the ``label`` (or ``cls``) of a ``json``
member, else -1. Samples without an image, and the tail of a truncated shard, are skipped with a
warning that names them; an image that does not decode is skipped (and counted) at training time.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path

import torch

from ibot.data.datasets import CACHE, IMG_EXTENSIONS, DatasetError, decode_or_skip

log = logging.getLogger("ibot")

INDEX_FILE = "index.json"  # an ``ibot shards`` folder's index: the samples of every shard, and the class names
INDEX_FORMAT = "ibot-shards-1"
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
MAX_OPEN = 64  # open shard files per process (ulimit -n is often 1024; there may be thousands of shards)
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> the three names (width of the first bound kept); ``{a,b}`` lists too."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise DatasetError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards; write {{low..high}}")
        items = [str(i).zfill(len(rng.group(1))) for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DatasetError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{000..127}} nor a list {{a,b}}")
    return [name for item in items for name in expand_braces(head + item + tail)]


def shard_files(path: str | Path) -> list[Path]:
    """The ``.tar`` shards ``path`` names: a folder (its ``*.tar``, sorted), one ``.tar``, a brace
    pattern or a glob. One-line :class:`DatasetError` when it names none or some are missing."""
    text = str(Path(str(path)).expanduser()) if "{" not in str(path) else os.path.expanduser(str(path))
    if "{" in text:
        names = expand_braces(text)
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise DatasetError(
                f"shard pattern {path!r} names {len(names)} files but {len(missing)} do not exist "
                f"(first: {missing[0]}); fix the pattern's range or folder"
            )
        return [Path(n) for n in names]
    if any(c in text for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text)) if p.endswith(".tar")]
    elif Path(text).is_dir():
        files = sorted(Path(text).glob("*.tar"))
    elif Path(text).is_file() and text.endswith(".tar"):
        files = [Path(text)]
    elif Path(text).exists():
        raise DatasetError(f"data.path {str(path)!r} is not a .tar shard; pass a folder of shards or a pattern")
    else:
        raise DatasetError(
            f"shards {str(path)!r} do not exist; pass data.path=DIR or data.path=DIR/shard-{{000..009}}.tar"
        )
    if not files:
        raise DatasetError(f"no .tar shards in {str(path)!r}; write some with `ibot shards SRC --out DIR`")
    return files


def is_shard_path(path: str | Path) -> bool:
    """Whether ``path`` names WebDataset shards: a brace pattern, a ``.tar`` file, or a folder of ``.tar`` files."""
    text = os.path.expanduser(str(path))
    if "{" in text or text.endswith(".tar"):
        return True
    return Path(text).is_dir() and any(Path(text).glob("*.tar"))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member path: key up to the first dot of the basename, extension after it."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label(data: bytes, ext: str) -> int:
    if ext == "cls":
        return int(data.decode().strip())
    obj = json.loads(data)
    value = obj.get("label", obj.get("cls", -1)) if isinstance(obj, dict) else obj
    return int(value) if isinstance(value, int) else -1


def _is_image(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTS


def _members(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """The consecutive key groups of a shard ``[(key, {ext: (offset, size)})]`` and whether it is truncated.

    Truncated: a member's data runs past the end (its sample is dropped), or the end-of-archive blocks
    are missing (the last sample is dropped: members of it may lie past the cut).
    """
    size, groups, cut = path.stat().st_size, [], None
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, ext = split_key(m.name)
                if m.offset_data + m.size > size:
                    cut = key
                    break
                if not m.isfile():
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1].setdefault(ext, (m.offset_data, m.size))
            if cut is None and size < tf.offset + 2 * tarfile.BLOCKSIZE:
                cut = groups[-1][0] if groups else ""
    except (tarfile.TarError, EOFError, OSError):
        cut = groups[-1][0] if groups else ""
    if cut is not None and groups and groups[-1][0] == cut:
        groups.pop()
    return groups, cut is not None


def scan_shard(path: Path) -> dict:
    """One shard's index: ``{"samples": [[key, ext, offset, size, label], ...], "no_image": [keys],
    "truncated": bool}``, the samples in tar order."""
    groups, truncated = _members(path)
    samples, no_image = [], []
    with open(path, "rb") as f:
        for key, members in groups:
            image = next((e for e in members if _is_image(e)), None)
            if image is None:
                no_image.append(key)
                continue
            label = -1
            for ext in ("cls", "json"):
                if ext in members:
                    off, n = members[ext]
                    try:
                        label = _label(os.pread(f.fileno(), n, off), ext)
                    except (ValueError, UnicodeDecodeError):
                        log.warning("shard %s: sample %s has an unreadable %s label; using -1", path, key, ext)
                    break
            samples.append([key, image, *members[image], label])
    return {"samples": samples, "no_image": no_image, "truncated": truncated}


def _cached_scan(path: Path) -> dict:
    """:func:`scan_shard`, cached under ``$IBOT_CACHE/shard-index`` by the shard's path, size and mtime."""
    st = path.stat()
    name = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = CACHE / "shard-index" / f"{name}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    entry = scan_shard(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(cache)
    except OSError:  # a read-only cache: scan again next time
        pass
    return entry


def _folder_index(folder: Path, memo: dict) -> dict:
    """The ``index.json`` of a shard folder (``ibot shards`` writes it), or {} when it has none."""
    if folder not in memo:
        try:
            data = json.loads((folder / INDEX_FILE).read_text())
            memo[folder] = data if data.get("format") == INDEX_FORMAT else {}
        except (OSError, ValueError, AttributeError):
            memo[folder] = {}
    return memo[folder]


def index_shards(shards: list[Path], progress: bool = True) -> tuple[list[dict], list[str]]:
    """The index of every shard (from its folder's ``index.json`` when it matches the shard's size, else
    scanned once and cached), and the class names of the index files (empty when none has them)."""
    from tqdm.auto import tqdm

    memo, entries, classes = {}, [], []
    for path in tqdm(shards, desc="indexing shards", unit="shard", disable=not progress or len(shards) < 8):
        index = _folder_index(path.parent, memo)
        known = index.get("shards", {}).get(path.name)
        if known is not None and known.get("size") == path.stat().st_size:
            entries.append({"samples": known["samples"], "no_image": [], "truncated": False})
            classes = classes or index.get("classes", [])
        else:
            entries.append(_cached_scan(path))
    return entries, classes


def key_share(key: str, seed: int = 0) -> float:
    """A sample key's place in [0, 1): a hash of ``(seed, key)``, the same in every run and process."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ShardDataset(torch.utils.data.Dataset):
    """The samples of WebDataset shards, map-style: ``dataset[i]`` -> ``(PIL image, label)`` or None.

    Args:
        path: a folder of ``.tar`` shards, one shard, a brace pattern (``shard-{000..127}.tar``) or a glob.

    Attributes:
        shards: the shard files; samples: ``(shard index, offset, size, label, name)`` per sample, name
            ``shard.tar:key.ext``; labels: (N,) long (-1 unlabelled); classes: class names ([] when
            unlabelled); keys: the ``__key__`` of each sample; skipped: ``{"no_image": n, "truncated": [shards]}``.
    """

    def __init__(self, path: str | Path, progress: bool = True) -> None:
        self.root = str(path)
        self.shards = shard_files(path)
        entries, classes = index_shards(self.shards, progress)
        self.samples, self.keys = [], []
        for si, (shard, entry) in enumerate(zip(self.shards, entries, strict=True)):
            for key, ext, off, size, label in entry["samples"]:
                self.samples.append((si, off, size, label, f"{shard.name}:{key}.{ext}"))
                self.keys.append(key)
        self.skipped = {
            "no_image": sum(len(e["no_image"]) for e in entries),
            "truncated": [s.name for s, e in zip(self.shards, entries, strict=True) if e["truncated"]],
        }
        _report_skipped(self.shards, entries)
        if not self.samples:
            raise DatasetError(f"the {len(self.shards)} shard(s) of {self.root!r} hold no sample with an image")
        self.labels = torch.tensor([s[3] for s in self.samples], dtype=torch.long)
        labelled = bool((self.labels >= 0).any())
        self.classes = list(classes) or ([str(c) for c in range(int(self.labels.max()) + 1)] if labelled else [])
        self.split = f"all {len(self.samples)} samples of {len(self.shards)} shard(s) {self.root}"
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:  # file descriptors do not travel to spawned workers
        return {**self.__dict__, "_fds": {}}

    def select(self, indices, split: str) -> ShardDataset:
        """A copy holding only the samples at ``indices`` (in that order), described by ``split``."""
        part = copy.copy(self)
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        part.samples, part.keys = [self.samples[i] for i in idx], [self.keys[i] for i in idx]
        part.labels = self.labels[torch.as_tensor(idx, dtype=torch.long)]
        part.split, part._fds = split, {}
        return part

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, i: int) -> tuple[bytes, str, int]:
        """The encoded image of sample ``i``, its name (``shard.tar:key.ext``) and its label."""
        si, off, size, label, name = self.samples[i]
        fd = self._fds.pop(si, None)
        if fd is None:
            fd = os.open(self.shards[si], os.O_RDONLY)
            if len(self._fds) >= MAX_OPEN:  # a bounded number of open shards per process (the oldest closes)
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[si] = fd  # most recently used last
        data = os.pread(fd, size, off)
        if len(data) != size:
            raise OSError(f"{name}: {len(data)} of {size} bytes (the shard changed or was truncated)")
        return data, name, label

    def __getitem__(self, i: int):
        return decode_or_skip(self.read_bytes, i, self.samples[i][4], what="sample")


def _report_skipped(shards: list[Path], entries: list[dict]) -> None:
    for shard, entry in zip(shards, entries, strict=True):
        if entry["truncated"]:
            log.warning(
                "shard %s is truncated: its %d complete samples are used, the rest skipped",
                shard,
                len(entry["samples"]),
            )
        if entry["no_image"]:
            keys = entry["no_image"]
            log.warning("shard %s: %d sample(s) without an image skipped (first: %s)", shard, len(keys), keys[0])


def shard_dataset(path: str | Path, train: bool, *, val_path: str | None = None, holdout: float = 0.1):
    """The train or evaluation split of shards: ``val_path``'s shards evaluate when given; else a seeded
    ``holdout`` share of the keys (by :func:`key_share`) is held out of training and is the evaluation split."""
    if val_path and not train:
        ds = ShardDataset(val_path)
        ds.split = f"data.val_path {val_path} ({len(ds)} samples)"
        return ds
    return hashed_split(ShardDataset(path), train, holdout, str(path), has_val=bool(val_path))


def hashed_split(full, train: bool, holdout: float, where: str, has_val: bool = False):
    """The training part (``train``) or the held-out part of ``full`` (a dataset with ``keys``, ``classes``
    and ``select``): the samples whose :func:`key_share` is below ``holdout`` are held out. With
    ``has_val`` (a separate evaluation set) or ``holdout=0`` nothing is held out."""
    if has_val or (holdout <= 0 and train):
        full.split = f"all {len(full)} samples of {where}" + ("" if has_val else " (no held-out split)")
        return full
    if holdout <= 0:
        raise DatasetError(
            f"{where} has no data.val_path and data.holdout=0, so there is nothing held out to evaluate on; "
            "set data.val_path=VAL_DATA or data.holdout=0.1"
        )
    held_mask = [key_share(k) < holdout for k in full.keys]
    held = [i for i, h in enumerate(held_mask) if h]
    kept = [i for i, h in enumerate(held_mask) if not h]
    if not train:
        if not full.classes:
            raise DatasetError(f"{where} has no labels: nothing to evaluate k-NN on (set data.label_key or add labels)")
        if not held:
            raise DatasetError(f"data.holdout={holdout} holds out none of the {len(full)} samples of {where}; raise it")
        return full.select(
            held, f"held-out {len(held)} of {len(full)} samples of {where} ({holdout:.0%} of keys, hashed)"
        )
    return full.select(kept, f"{len(kept)} of {len(full)} samples of {where} ({len(held)} held out for evaluation)")
