"""Hugging Face datasets on disk (data.dataset=hf): save_to_disk and Parquet folders, column detection,
skipped rows named, the hashed holdout, detection from data.path, and exact mid-epoch resume."""

import io
import json
import logging

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from ibot.data.datasets import DatasetError, build_dataset  # noqa: E402
from ibot.data.hf import HFImageDataset  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30 + i % 4, 28), (30 + 5 * i, 200 - 4 * i, 60 + 90 * (i % 2))).save(buf, "PNG")
    return buf.getvalue()


def _table(n=40, bad=()):
    feats = datasets.Features(
        {
            "picture": datasets.Image(),
            "y": datasets.ClassLabel(names=["odd", "even"][::-1]),
            "id": datasets.Value("string"),
        }
    )
    rows = {
        "picture": [{"bytes": b"broken" if i in bad else _png(i), "path": None} for i in range(n)],
        "y": [i % 2 for i in range(n)],
        "id": [f"img-{i}" for i in range(n)],
    }
    return datasets.Dataset.from_dict(rows, features=feats)


def test_save_to_disk_columns_labels_and_skips(tmp_path, caplog):
    _table(6, bad={3}).save_to_disk(str(tmp_path / "saved"))
    ds = HFImageDataset(tmp_path / "saved")
    assert (ds.image_key, ds.label_key, ds.classes) == ("picture", "y", ["even", "odd"])
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 1] and ds.keys[:2] == ["img-0", "img-1"]
    assert ds[2][0].size == (32, 28)
    with caplog.at_level(logging.WARNING, logger="ibot"):
        assert ds[3] is None
    assert f"skipping unreadable image {tmp_path / 'saved'}[3]" in caplog.text
    with pytest.raises(DatasetError, match="data.image_key='pic' is not a column.*picture, y, id"):
        HFImageDataset(tmp_path / "saved", image_key="pic")


def test_parquet_folder_dataset_dict_and_holdout(tmp_path):
    _table(40).to_parquet(str(tmp_path / "pq" / "data" / "train-0.parquet"))
    train = build_dataset("hf", str(tmp_path / "pq"), train=True, holdout=0.2)
    held = build_dataset("hf", str(tmp_path / "pq"), train=False, holdout=0.2)
    assert set(train.keys).isdisjoint(held.keys) and len(train) + len(held) == 40 and len(held) >= 2
    datasets.DatasetDict({"train": _table(10), "test": _table(4)}).save_to_disk(str(tmp_path / "dict"))
    assert len(build_dataset("hf", str(tmp_path / "dict"), train=True, val_path="split:test")) == 10
    assert len(build_dataset("hf", str(tmp_path / "dict"), train=False, val_path="split:test")) == 4


def test_data_path_of_a_saved_dataset_is_detected(tmp_path):
    from ibot.data_setup import folder_overrides

    _table(12).save_to_disk(str(tmp_path / "saved"))
    add, msg = folder_overrides(
        {"data.dataset": "fashion_mnist", "model.in_chans": 1}, {"data.path": str(tmp_path / "saved")}
    )
    assert add["data.dataset"] == "hf" and add["model.in_chans"] == 3 and "12 rows" in msg and "2 classes" in msg


def test_resumed_mid_epoch_run_on_hf_gives_the_same_losses(tmp_path):
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    _table(40).save_to_disk(str(tmp_path / "saved"))

    def fit(run, steps):
        ov = [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", "data.dataset=hf"]
        ov += [f"data.path={tmp_path}/saved", "data.pipeline=gpu", "optim.batch_size=8", "optim.epochs=2"]
        ov += ["data.num_workers=0", f"run.max_steps={steps}"]
        Trainer(build_config("smoke", ov), log=lambda *a: None).fit()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    full = fit(tmp_path / "full", 8)
    fit(tmp_path / "part", 3)
    assert fit(tmp_path / "part", 8) == full and len(full) == 8


def test_ibot_shards_from_a_saved_dataset(tmp_path):
    from ibot.data.shard_writer import write_shards
    from ibot.data.shards import ShardDataset

    _table(10, bad={4}).save_to_disk(str(tmp_path / "saved"))
    write_shards(tmp_path / "saved", tmp_path / "wds", shard_size=4, progress=False, log=str)
    shards, rows = ShardDataset(tmp_path / "wds"), HFImageDataset(tmp_path / "saved")
    assert shards.classes == rows.classes and len(shards) == 9  # row 4's bytes are no image: skipped
    by_key = {int(k): i for i, k in enumerate(shards.keys)}  # keys are the row numbers
    assert sorted(by_key) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    for row in by_key:
        data, name, label = shards.read_bytes(by_key[row])
        assert (data, label) == rows.read_bytes(row)[::2] and name.endswith(".png")
