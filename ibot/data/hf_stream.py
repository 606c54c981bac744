"""Hugging Face datasets streamed (``data.dataset=hf data.streaming=true``), for sets too big to map.

Sources: a ``save_to_disk`` folder (its memory-mapped Arrow files, cut into equal row ranges), a
folder of Parquet files (one shard per row group, read with pyarrow, only the columns used) or a
hub name (``datasets.load_dataset(NAME, streaming=True)``, which needs the network). Each becomes a
``datasets.IterableDataset`` of rows ``{"image": bytes, "label": int, "key": str}``; images are
decoded by ibot, so an undecodable row is skipped, named and counted as a file would be. Columns are
detected as for the map-style reading (:func:`ibot.data.hf.columns`), and so is the holdout: the
key column (``__key__`` / ``key`` / ``id``), else the row number (local sources, whose row numbers
are those of the map-style reading), else, for a hub stream, a hash of the image bytes.

**Order.** Epoch ``e``: ``ds.shuffle(seed=run.seed, buffer_size=data.shuffle_buffer)`` with
``set_epoch(e)`` (the shard order and the buffer's draws follow ``(seed, epoch)``), split with
``datasets.distributed.split_dataset_by_node`` over ``ranks x workers`` slots, slot
``rank * workers + worker``: whole shards when there are at least as many as slots, else every slot
keeps one row in ``slots`` of every shard (and reads them all). A slot's rows are its training rows
in that order (held-out keys are filtered out before they count). Rank ``r``'s step ``k`` is the
``k // workers``-th batch of slot ``(r, k % workers)``: the order in which a DataLoader takes its
workers' batches. No row is in two slots.

**Length.** A stream has no ``len``: an epoch is ``data.steps_per_epoch`` steps, else
``rows * (1 - data.holdout) // (batch * ranks)`` with ``rows`` the row count the source declares
(exact for local sources; a hub dataset's ``info``, when it has one), else a one-line error. A
slot whose rows run out before its share of the steps reads them again (a second pass, reshuffled),
one with rows left stops early (they fall to other slots in later epochs): with equal shards and no
holdout, an epoch reads every row once; otherwise a few rows repeat or wait by the imbalance of the
slots (hashed holdout, whole Parquet row groups).

**Exact mid-epoch resume.** Where every slot stands is a function of ``(epoch, step_in_epoch)``
and the layout: slot ``(r, w)`` has consumed ``batch * len(range(w, step, workers))`` training
rows (:meth:`HFStream.rows_read`, saved in the checkpoint). A resumed worker rebuilds the same
ordered stream and skips that many rows, reading them again without decoding them: a ``datasets``
``state_dict`` restores shard positions but not the content of a shuffle buffer, so it cannot resume
the same order. The cost is reading up to one epoch's share of the slot's rows (bytes only, no
decode or augmentation) at a resume. The DataLoader's first batch after a resume comes from worker
0, so worker ``p`` plays slot ``(p + step) % workers``.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import torch

from ibot.data.datasets import DatasetError, decode_or_skip
from ibot.data.hf import HFImageDataset, columns, image_bytes, is_hf_path, load_table
from ibot.data.loader import mix_seed, seeded_crops
from ibot.data.shards import key_share

SHARD_ROWS = 1_000  # rows per shard of a save_to_disk folder, at most (it is cut into a multiple of the slots)
EVAL_ROWS = 10_000  # rows of a streamed k-NN memory bank, and at most as many held-out queries
READ_BATCH = 64  # rows taken from an iterable dataset at a time
_DISK: dict = {}  # (path, split) -> the memory-mapped Dataset, one per process
_EVAL: dict = {}  # the streamed evaluation sets of this process (read once)


def row_id(key: str) -> int:
    """A row's integer id (its crops and masks are seeded by it): 63 bits of a hash of its key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _features():
    import datasets

    return datasets.Features(
        {"image": datasets.Value("binary"), "label": datasets.Value("int64"), "key": datasets.Value("string")}
    )


def _disk(path: str, split: str | None):
    """The memory-mapped ``Dataset`` of a ``save_to_disk`` folder, images as bytes (opened once per process)."""
    import datasets

    if (path, split) not in _DISK:
        ds = load_table(path, split)
        images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        for c in images:
            ds = ds.cast_column(c, datasets.Image(decode=False))
        _DISK[(path, split)] = ds
    return _DISK[(path, split)]


def _row(value, label, key, column: str) -> dict:
    try:
        data = image_bytes(value, column)
    except (OSError, TypeError, KeyError):  # no bytes: skipped (and named) when decoded
        data = b""
    return {"image": data, "label": -1 if label is None else int(label), "key": str(key)}


def _local_rows(shards, spec):
    """The rows of local shards (the generator of :meth:`StreamSource.rows`). ``spec``: ``(kind, path,
    split, image, label, key columns)``; a shard: ``(Parquet file or "", row group, first row, rows)``."""
    import pyarrow.parquet as pq

    kind, path, split, image, label, key = spec
    cols = [c for c in (image, label, key) if c]
    for file, group, first, n in shards:
        if kind == "parquet":  # one row group, only the columns used
            table = pq.ParquetFile(file).read_row_group(group, columns=cols)
            parts = ((s, table.slice(s, 256).to_pydict()) for s in range(0, n, 256))
        else:
            ds = _disk(path, split).select_columns(cols)
            parts = ((s, ds[first + s : first + min(n, s + 256)]) for s in range(0, n, 256))
        for start, part in parts:
            for j, value in enumerate(part[image]):
                row = first + start + j
                yield _row(value, part[label][j] if label else None, part[key][j] if key else row, image)


def _hub_row(row: dict, cols: tuple) -> dict:
    image, label, key = cols
    out = _row(row[image], row[label] if label else None, row[key] if key else "", image)
    if not key:  # no key column and no row numbers in a hub stream: the image's bytes are its key
        out["key"] = hashlib.blake2b(out["image"], digest_size=16).hexdigest()
    return out


def _open_hub(name: str, split: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as err:  # noqa: BLE001 - any failure to open: one line naming the name and the fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DatasetError(
            f"cannot stream {name!r} from the Hugging Face hub ({type(err).__name__}: {first}); pass a local "
            "save_to_disk or Parquet folder, or check the name and the network"
        ) from err


def _looks_local(path: str) -> bool:
    """A path, not a hub name (``name`` or ``owner/name``): absolute, relative to ``.``, deeper, or a file."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith((".parquet", ".arrow")) or path.count("/") > 1


def _ranges(n: int, slots: int) -> list[tuple]:
    """``n`` rows cut into a multiple of ``slots`` equal ranges of at most about :data:`SHARD_ROWS` rows."""
    k = slots * max(1, -(-n // (slots * SHARD_ROWS)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [("", 0, lo, hi - lo) for lo, hi in itertools.pairwise(bounds)]


class StreamSource:
    """A streamed Hugging Face dataset: its columns, classes and row count, and its rows (:meth:`rows`).

    Args:
        path: a ``save_to_disk`` folder, a folder of Parquet files (``DIR/*.parquet``, ``DIR/data/*.parquet``)
            or a hub name.
        split: a DatasetDict's (or the hub dataset's) split; default its train split.
        image_key, label_key: the columns (``data.image_key`` / ``data.label_key``), else detected.

    Attributes: kind ("disk", "parquet" or "hub"), num_rows (None when a hub dataset does not declare it),
    image_key, label_key, key_col (None: the row number, or for the hub the image bytes, is the key),
    classes. Picklable: the DataLoader workers rebuild :meth:`rows`.
    """

    def __init__(self, path, split: str | None = None, image_key: str | None = None, label_key: str | None = None):
        self.path, self.split, self.groups = str(path), split, []
        root = Path(self.path).expanduser()
        if root.is_dir() and is_hf_path(root):
            ds = self._open_local(root)
        elif root.exists() or _looks_local(self.path):
            raise DatasetError(
                f"Hugging Face dataset {self.path!r} does not exist or is neither a save_to_disk folder nor a folder "
                "of .parquet files; pass one of these, or a hub name"
            )
        else:
            self.kind, ds = "hub", _open_hub(self.path, split)
            info = (getattr(ds.info, "splits", None) or {}).get(split or "train")
            self.num_rows = getattr(info, "num_examples", None) or None
        self.image_key, self.label_key, self.key_col = columns(ds, image_key, label_key, self.path)
        feature = ds.features.get(self.label_key) if self.label_key else None
        self.classes = list(getattr(feature, "names", None) or [])
        if self.num_rows == 0:
            raise DatasetError(f"the Hugging Face dataset at {self.path} has no rows")

    def _open_local(self, root: Path):
        """A saved folder (memory-mapped) or Parquet files (their footers: row groups and schema)."""
        from types import SimpleNamespace

        import datasets
        import pyarrow.parquet as pq

        if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
            self.kind, ds = "disk", _disk(self.path, self.split)
            self.num_rows = len(ds)
            return ds
        self.kind, first = "parquet", 0
        files = sorted(str(p) for p in root.rglob("*.parquet"))  # the map-style reading's order (row numbers)
        if not files:
            raise DatasetError(f"{root} is neither a save_to_disk folder nor a folder of .parquet files")
        for file in files:
            meta = pq.ParquetFile(file).metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.groups += [(file, g, first, n)] if n else []
                first += n
        self.num_rows = first
        features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        return SimpleNamespace(features=features, column_names=list(features))

    def rows(self, slots: int = 1):
        """The rows as a ``datasets.IterableDataset`` of ``{"image", "label", "key"}`` in shards: a saved folder
        cut into a multiple of ``slots`` equal row ranges, Parquet files by row group, a hub dataset by file
        (by row group where ``reshard`` can)."""
        import datasets

        cols = (self.image_key, self.label_key, self.key_col)
        if self.kind != "hub":
            shards = self.groups if self.kind == "parquet" else _ranges(self.num_rows, slots)
            spec = (self.kind, self.path, self.split, *cols)
            kw = {"shards": shards, "spec": spec}
            return datasets.IterableDataset.from_generator(_local_rows, features=_features(), gen_kwargs=kw)
        used = [c for c in cols if c]
        ds = _open_hub(self.path, self.split).select_columns(used)
        try:
            ds = ds.reshard()
        except (AttributeError, NotImplementedError, ValueError):
            pass
        if isinstance(ds.features[self.image_key], datasets.Image):
            ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
        drop = [c for c in used if c not in ("image", "label", "key")]
        return ds.map(_hub_row, fn_kwargs={"cols": cols}, remove_columns=drop, features=_features())


def epoch_steps(source: StreamSource, batch: int, world: int, holdout: float, steps_per_epoch: int = 0) -> int:
    """Steps of an epoch of a stream: ``steps_per_epoch`` when given, else its declared rows less the
    held-out share over the total batch; a one-line error when it declares no row count or too few rows."""
    if steps_per_epoch:
        return steps_per_epoch
    if source.num_rows is None:
        raise DatasetError(
            f"{source.path} streams without a row count, so an epoch has no length; set data.steps_per_epoch=N"
        )
    rows = int(source.num_rows * (1 - holdout))
    if rows < batch * world:
        raise DatasetError(
            f"{source.path} has about {rows} training rows, fewer than one batch ({batch} x {world} processes); "
            "lower optim.batch_size or add rows"
        )
    return rows // (batch * world)


class HFStream(torch.utils.data.IterableDataset):
    """This rank's training rows of a :class:`StreamSource`, each as ``(crops, label, row id, epoch)`` (None
    when its image does not decode), in the order, split and resume of the module doc.

    Args:
        source: the rows. transform: PIL image -> crops (seeded by ``(seed, epoch, row id)``).
        batch_size: per rank; niter: steps of an epoch (:func:`epoch_steps`).
        seed, rank, world: the run's. holdout: share of keys held out (hashed; 0 with a ``data.val_path``).
        buffer_size: the shuffle buffer (rows) of each slot.

    :meth:`set_position` (in shared memory, so persistent workers follow) sets the epoch and the step the
    next ``iter()`` starts at.
    """

    def __init__(self, source, transform, *, batch_size, niter, seed=0, rank=0, world=1, holdout=0.0, buffer_size=1000):
        self.source, self.transform, self.batch_size, self.niter = source, transform, batch_size, niter
        self.seed, self.rank, self.world, self.holdout, self.buffer_size = seed, rank, world, holdout, buffer_size
        self.position = torch.zeros(2, dtype=torch.long).share_memory_()
        self._bases: dict = {}

    def __getstate__(self) -> dict:  # workers rebuild the iterable datasets
        return {**self.__dict__, "_bases": {}}

    def set_position(self, epoch: int, start_step: int) -> None:
        self.position.copy_(torch.tensor([epoch, start_step]))

    def __len__(self) -> int:  # this rank's rows left in the epoch
        return (self.niter - int(self.position[1])) * self.batch_size

    def rows_read(self, step: int, workers: int) -> list[int]:
        """Training rows each of a rank's ``workers`` slots has consumed before ``step`` of an epoch."""
        return [self.batch_size * len(range(w, step, workers)) for w in range(workers)]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        p, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = (int(v) for v in self.position.tolist())
        w = (p + start) % workers  # the DataLoader's first batch (worker 0's) is step `start`
        skip, end = self.rows_read(start, workers)[w], self.rows_read(self.niter, workers)[w]
        rows = self.slot_rows(epoch, self.rank * workers + w, self.world * workers)
        for data, label, key in itertools.islice(rows, skip, end):  # the skipped rows are read, not decoded
            yield self._item(data, label, key, epoch)

    def slot_rows(self, epoch: int, slot: int, slots: int):
        """Slot ``slot`` of ``slots``: its training rows ``(bytes, label, key)`` of ``epoch`` in order, then
        again (another pass, reshuffled), without end."""
        from datasets.distributed import split_dataset_by_node

        if slots not in self._bases:
            self._bases[slots] = self.source.rows(slots)
        for n_pass in itertools.count():
            seed = mix_seed(self.seed, n_pass) if n_pass else self.seed  # a later pass: another order
            ds = self._bases[slots].shuffle(seed=seed, buffer_size=self.buffer_size)
            strategy = "shards" if ds.num_shards >= slots else "examples"
            ds = split_dataset_by_node(ds, rank=slot, world_size=slots, strategy=strategy)
            ds.set_epoch(epoch)  # after the split: split_dataset_by_node starts a new dataset at epoch 0
            got = 0
            for batch in ds.iter(batch_size=READ_BATCH):
                for row in zip(batch["image"], batch["label"], batch["key"], strict=True):
                    if self.holdout <= 0 or key_share(row[2]) >= self.holdout:
                        got += 1
                        yield row
            if not got:
                raise DatasetError(
                    f"slot {slot} of {slots} (processes x data.num_workers) of {self.source.path} has no training "
                    "rows; use fewer data.num_workers"
                )

    def _item(self, data: bytes, label: int, key: str, epoch: int):
        name = f"{self.source.path}[{key}]"
        item = decode_or_skip(lambda _: (data, name, label), 0, name, what="row")
        if item is None:
            return None
        i = row_id(key)
        return seeded_crops(self.transform, item[0], self.seed, epoch, i), item[1], i, epoch


def _read(source: StreamSource, holdout: float, limit: int) -> tuple[list, list]:
    """The first ``limit`` training rows and the first ``limit`` held-out rows of a source, in file order."""
    kept, held = [], []
    for batch in source.rows().iter(batch_size=READ_BATCH):
        for row in zip(batch["image"], batch["label"], batch["key"], strict=True):
            part = held if holdout > 0 and key_share(row[2]) < holdout else kept
            if len(part) < limit:
                part.append(row)
        if len(kept) >= limit and (holdout <= 0 or len(held) >= limit):
            break
    return kept, held


def _table(rows: list, source: StreamSource, split: str) -> HFImageDataset:
    import datasets

    data, labels, keys = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [])
    table = datasets.Dataset.from_dict({"image": data, "label": labels, "key": keys}, features=_features())
    ds = HFImageDataset.from_table(table, source.path, "image", "label")
    ds.classes = source.classes or ds.classes
    ds.split = split
    return ds


def _eval_rows(path, holdout, val_path, image_key, label_key, limit) -> tuple[list, list, StreamSource]:
    """(bank rows, query rows, the queries' source) of :func:`stream_eval_set`."""
    source = StreamSource(path, image_key=image_key, label_key=label_key)
    if not val_path:
        return (*_read(source, holdout, limit), source)
    split = val_path[len("split:") :] if val_path.startswith("split:") else None
    queries = StreamSource(path if split else val_path, split=split, image_key=image_key, label_key=label_key)
    return _read(source, 0.0, limit)[0], _read(queries, 0.0, limit)[0], queries


def stream_eval_set(path, train: bool, *, holdout=0.1, val_path=None, image_key=None, label_key=None):
    """The k-NN memory bank (``train``) or queries of a streamed dataset, read once per process in file order
    and held in memory as encoded bytes: the first :data:`EVAL_ROWS` training rows, and the first
    :data:`EVAL_ROWS` rows of ``val_path`` (a folder or hub name, or ``split:NAME``) or, without one, of the
    held-out rows (``holdout`` of the keys, hashed: the rule of the training stream)."""
    key = (str(path), holdout, val_path, image_key, label_key, EVAL_ROWS)
    if key not in _EVAL:
        _EVAL.clear()
        _EVAL[key] = _eval_rows(path, holdout, val_path, image_key, label_key, EVAL_ROWS)
    bank, queries, source = _EVAL[key]
    if train:
        return _table(bank, source, f"the first {len(bank)} training rows of {path} (streamed)")
    if not val_path and holdout <= 0:
        raise DatasetError(
            f"{path} has no data.val_path and data.holdout=0, so there is nothing held out to evaluate on; "
            "set data.val_path=VAL_DATA or data.holdout=0.1"
        )
    if not source.label_key:
        raise DatasetError(f"{path} has no labels: nothing to evaluate k-NN on (set data.label_key or add labels)")
    if not queries:
        raise DatasetError(f"data.holdout={holdout} holds out none of the rows of {path} read; raise it")
    what = f"rows of {val_path}" if val_path else f"held-out rows of {path} ({holdout:.0%} of keys, hashed)"
    return _table(queries, source, f"the first {len(queries)} {what} (streamed)")
