"""Hugging Face datasets on disk (``data.dataset=hf``): a ``save_to_disk`` folder or a folder of Parquet files.

Needs the ``datasets`` library (``pip install 'ibot[hf]'``). The image column is ``data.image_key``,
else the first column of type ``Image``, else one named image / img / jpg / png; the label column
is ``data.label_key``, else the first ``ClassLabel`` column, else one named label / labels / cls /
class (none: unlabelled). Images are read as their encoded bytes and decoded by ibot (PIL, or
torchvision on ``data.pipeline=gpu``), so an undecodable row is skipped, named (``PATH[row]``) and
counted as for image files. Rows are addressed by index, so sampling, rank splits and mid-epoch
resume are those of every map-style dataset; the held-out split is a hashed share of the row keys
(the ``__key__`` / ``key`` / ``id`` column, else the row number), as for shards. A set too big to map
streams instead (``data.streaming=true``, :mod:`ibot.data.hf_stream`), with the same columns and holdout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ibot.data.datasets import DatasetError, decode_or_skip
from ibot.data.shards import hashed_split

IMAGE_NAMES = ("image", "img", "jpg", "png", "webp")
LABEL_NAMES = ("label", "labels", "cls", "class")
KEY_NAMES = ("__key__", "key", "id")
MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\0", ".tif"),
    (b"MM\0*", ".tif"),
)


def is_hf_path(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (Dataset or DatasetDict) or holds Parquet files."""
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        return False
    marks = ("dataset_info.json", "state.json", "dataset_dict.json")
    # only the top and data/ (the Hub's layout): an image folder is never walked
    return any((root / m).is_file() for m in marks) or any(root.glob("*.parquet")) or any(root.glob("data/*.parquet"))


def load_table(path: str | Path, split: str | None):
    """The ``datasets.Dataset`` at ``path`` (a DatasetDict's ``split``, else its train split)."""
    try:
        import datasets
    except ImportError as err:
        raise DatasetError("data.dataset=hf needs the datasets library: pip install 'ibot[hf]'") from err
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Hugging Face dataset folder {str(path)!r} does not exist; pass a save_to_disk folder")
    parquet = sorted(str(p) for p in root.rglob("*.parquet"))
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(root))
    elif parquet:
        ds = datasets.Dataset.from_parquet(parquet)
    else:
        raise DatasetError(f"{root} is neither a save_to_disk folder nor a folder of .parquet files")
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise DatasetError(f"{root} has splits {sorted(ds)}, not {name!r}")
        ds = ds[name]
    return ds


def _column(ds, given: str | None, kind: str, names: tuple, key: str):
    """The column ``given`` (checked), else the first of feature type ``kind``, else the first of ``names``."""
    cols = list(ds.column_names)
    if given:
        if given not in cols:
            raise DatasetError(f"{key}={given!r} is not a column of the dataset; its columns: {', '.join(cols)}")
        return given
    typed = [c for c in cols if type(ds.features[c]).__name__ == kind]
    named = [c for c in cols if c.lower() in names]
    return (typed or named or [None])[0]


def _ext(data: bytes) -> str:
    for magic, ext in MAGIC:
        if data.startswith(magic):
            return ext
    return ".webp" if data[8:12] == b"WEBP" else ""


def columns(ds, image_key: str | None, label_key: str | None, where) -> tuple[str, str | None, str | None]:
    """``(image, label, key)`` columns of a ``Dataset`` or ``IterableDataset``: the image column (given, else
    detected; none is a one-line error naming ``data.image_key``), the label column (None: unlabelled) and
    the key column the holdout hashes (``__key__`` / ``key`` / ``id``; None: the row number)."""
    if not ds.column_names or ds.features is None:
        raise DatasetError(f"{where} does not declare its columns; set data.image_key=COLUMN and data.label_key=COLUMN")
    image = _column(ds, image_key, "Image", IMAGE_NAMES, "data.image_key")
    if image is None:
        raise DatasetError(f"{where} has no image column ({', '.join(ds.column_names)}); set data.image_key=COLUMN")
    label = _column(ds, label_key, "ClassLabel", LABEL_NAMES, "data.label_key")
    return image, label, next((c for c in KEY_NAMES if c in ds.column_names), None)


def image_bytes(value, column: str) -> bytes:
    """The encoded image in a cell: ``Image(decode=False)``'s ``{"bytes", "path"}`` or raw bytes (OSError otherwise)."""
    if isinstance(value, dict):
        return value.get("bytes") or Path(value["path"]).read_bytes()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise OSError(f"column {column!r} holds {type(value).__name__}, not an encoded image")


class HFImageDataset(torch.utils.data.Dataset):
    """Rows of a Hugging Face dataset as ``(PIL image, label)`` (None when the image does not decode).

    Attributes: root, labels ((N,) long, -1 unlabelled), classes, keys (hashed for the holdout),
    image_key, label_key, split.
    """

    def __init__(self, path, split: str | None = None, image_key: str | None = None, label_key: str | None = None):
        self._setup(load_table(path, split), str(path), image_key, label_key)

    @classmethod
    def from_table(cls, table, root: str, image_key: str | None = None, label_key: str | None = None):
        """The rows of an in-memory ``datasets.Dataset`` (a streamed evaluation set), named ``root[row]``."""
        self = cls.__new__(cls)
        self._setup(table, root, image_key, label_key)
        return self

    def _setup(self, ds, root: str, image_key: str | None, label_key: str | None) -> None:
        import datasets

        self.root = root
        self.image_key, self.label_key, key_col = columns(ds, image_key, label_key, root)
        if isinstance(ds.features[self.image_key], datasets.Image):  # the bytes: ibot decodes (and skips)
            ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
        self.table = ds
        n = len(ds)
        labels = ds[self.label_key] if self.label_key else [-1] * n
        self.labels = torch.tensor([int(x) if x is not None else -1 for x in labels], dtype=torch.long)
        feature = ds.features.get(self.label_key) if self.label_key else None
        names = list(getattr(feature, "names", None) or [])
        labelled = bool((self.labels >= 0).any())
        self.classes = names or ([str(c) for c in range(int(self.labels.max()) + 1)] if labelled else [])
        self.keys = [str(k) for k in ds[key_col]] if key_col else [str(i) for i in range(n)]
        self.rows = list(range(n))
        self.split = f"all {n} rows of {root}"
        if not n:
            raise DatasetError(f"the Hugging Face dataset at {root} has no rows")

    def select(self, indices, split: str) -> HFImageDataset:
        """A copy holding only the rows at ``indices`` (in that order), described by ``split``."""
        import copy

        part = copy.copy(self)
        idx = torch.as_tensor(indices, dtype=torch.long)
        part.rows = [self.rows[i] for i in idx.tolist()]
        part.keys = [self.keys[i] for i in idx.tolist()]
        part.labels, part.split = self.labels[idx], split
        return part

    def __len__(self) -> int:
        return len(self.rows)

    def read_bytes(self, i: int) -> tuple[bytes, str, int]:
        """The encoded image of item ``i``, its name (``PATH[row].ext``) and its label."""
        row = self.rows[i]
        data = image_bytes(self.table[row][self.image_key], self.image_key)
        return data, f"{self.root}[{row}]{_ext(data)}", int(self.labels[i])

    def __getitem__(self, i: int):
        return decode_or_skip(self.read_bytes, i, f"{self.root}[{self.rows[i]}]")


def hf_dataset(path, train: bool, *, val_path=None, holdout: float = 0.1, image_key=None, label_key=None):
    """The train or evaluation split of a Hugging Face dataset: ``val_path`` (a folder, or ``split:NAME``
    for a split of the same DatasetDict) evaluates when given; else ``holdout`` of the keys, hashed."""
    kw = dict(image_key=image_key, label_key=label_key)
    if val_path and not train:
        split = val_path[len("split:") :] if val_path.startswith("split:") else None
        ds = HFImageDataset(path if split else val_path, split=split, **kw)
        ds.split = f"data.val_path {val_path} ({len(ds)} rows)"
        return ds
    return hashed_split(HFImageDataset(path, **kw), train, holdout, str(path), has_val=bool(val_path))
