"""Data faults: unreadable images in training and in the end-of-run k-NN, folders of only bad images,
paths that are files, float TIFFs, and the skip-fraction denominator."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from ibot.config import build_config
from ibot.data import datasets
from ibot.data.datasets import load_image
from ibot.train.trainer import Trainer


def _split_folder(root, n=8, bad_train=1, bad_val=1):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                color = (200, 30 + 10 * i, 30) if c == "a" else (30, 30 + 10 * i, 200)
                Image.new("RGB", (36, 36), color).save(root / split / c / f"{i}.png")
        for i in range(bad_train if split == "train" else bad_val):
            (root / split / "a" / f"bad{i}.jpg").write_bytes(b"not a jpeg")


def test_unreadable_image_in_the_end_of_run_knn(tmp_path, cli):
    _split_folder(tmp_path / "imgs", n=16)
    code, out, err = cli(
        "pretrain",
        "preset=smoke",
        "run.progress=false",
        "data.dataset=imagefolder",
        f"data.path={tmp_path / 'imgs'}",
        "optim.batch_size=8",
        "data.max_skip_fraction=0.5",
        "run.max_steps=1",
        f"run.output_dir={tmp_path / 'run'}",
    )
    assert code == 0, err
    assert "RESULT k-NN top-1" in out
    res = json.loads((tmp_path / "run" / "knn.jsonl").read_text().splitlines()[-1])
    assert (res["n_train"], res["n_test"]) == (16, 16)  # the unreadable file of each split left out, not a crash


def test_folder_of_only_unreadable_images(tmp_path, cli):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    for i in range(16):
        (tmp_path / "bad" / "a" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cli.fails(
        "pretrain",
        *cli.SMOKE,
        "data.dataset=imagefolder",
        f"data.path={tmp_path / 'bad'}",
        "optim.batch_size=4",
        f"run.output_dir={tmp_path / 'run'}",
        needles=["none of the first 4 images could be read", "data.path"],
    )
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


class _FirstImagesOnly:
    """A dataset whose images after the first ``n`` read are unreadable (``None``, as a bad file)."""

    def __init__(self, dataset, n):
        self.dataset, self.n, self.reads = dataset, n, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        return self.dataset[i] if self.reads <= self.n else None


@pytest.mark.parametrize("pipeline", ["pil", "gpu"])
def test_batches_of_only_unreadable_images_are_skipped_on_every_pipeline(tmp_path, pipeline):
    """Issue 25 item 4: the gpu pipeline crashed (internal TypeError in DeviceAugment) where pil skipped."""
    _split_folder(tmp_path / "imgs", n=16, bad_train=0, bad_val=0)
    over = ["data.dataset=imagefolder", f"data.path={tmp_path / 'imgs'}", f"data.pipeline={pipeline}"]
    over += [f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.knn_at_end=false"]
    cfg = build_config("smoke", [*over, "optim.batch_size=4", "optim.epochs=1", "data.max_skip_fraction=1"])
    tr = Trainer(cfg, log=lambda *a: None)
    tr.data.mc_dataset.dataset = _FirstImagesOnly(tr.data.mc_dataset.dataset, 4)  # batch 1 readable, then none
    steps = []
    train_step = tr.train_step
    tr.train_step = lambda batch, it, **kw: steps.append(it) or train_step(batch, it, **kw)
    tr.fit()
    assert tr.data.niter == 4 and tr.global_step == 4 and steps == [0]
    assert (tr.attempted_images, tr.skipped_images) == (16, 12)


def test_data_path_is_a_file(tmp_path, cli):
    (tmp_path / "images.zip").write_bytes(b"PK")
    cli.fails(
        "pretrain",
        *cli.SMOKE,
        "data.dataset=imagefolder",
        f"data.path={tmp_path / 'images.zip'}",
        needles=["is a file"],
    )


def test_folder_without_images(tmp_path, cli):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    cli.fails(
        "pretrain", *cli.SMOKE, "data.dataset=imagefolder", f"data.path={tmp_path / 'empty'}", needles=["no images"]
    )
    cli.fails("pretrain", *cli.SMOKE, "data.dataset=folder", needles=["needs data.path"])


@pytest.mark.parametrize("peak,expected_max", [(1.0, 255), (0.5, 127), (1000.0, 255)])
def test_float_tiff_is_scaled_and_warned(tmp_path, caplog, monkeypatch, peak, expected_max):
    monkeypatch.setattr(datasets, "_warned_float", False)
    arr = np.linspace(0, peak, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    with caplog.at_level(logging.WARNING, logger="ibot"):
        img = load_image(tmp_path / "f.tif")
    assert img.mode == "L" and img.getextrema() == (0, expected_max)  # not all black
    assert any("float image" in r.getMessage() for r in caplog.records)


def test_skip_fraction_counts_every_image_tried(tmp_path):
    data = tmp_path / "imgs"
    _split_folder(data, n=12, bad_train=2, bad_val=0)
    cfg = build_config(
        "smoke",
        [
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.knn_at_end=false",
            "data.dataset=imagefolder",
            f"data.path={data}",
            "optim.batch_size=14",
            "data.max_skip_fraction=0.5",
            "optim.epochs=2",
        ],
    )
    tr = Trainer(cfg, log=lambda *a: None)
    tr.fit()
    assert tr.skipped_images == 4 and tr.attempted_images == 28  # 2 epochs x (12 readable + 2 unreadable)
    tr.cfg.data.max_skip_fraction = 0.05
    tr.skipped_images, tr.attempted_images = 11, 220  # 5.0% of the tried images: at the limit, not over
    tr._check_skips()
    tr.skipped_images = 12
    with pytest.raises(Exception, match=r"12 unreadable images skipped out of 220 \(5.5%"):
        tr._check_skips()
